"""Where the fine-tuning step's peak GPU memory is reached, measured per phase.

    python benchmarks/train_memory.py OUT.json [CTX ...]      (one GPU; default ctx 8192 32768)

LLaMA-2-7B shape, random weights, bf16, one window per step, the `scca-eval finetune` step
(LoRA q/k/v/o + embeddings + norms, gradient checkpointing, chunked loss) under full
attention, with the activations offloaded to host memory and kept on the GPU. For each it
reports, in GiB: what is allocated before the step (weights and, after the first step,
AdamW's state), the peak of the forward and backward passes, and the peak of the
optimizer step (the second step's figures, once AdamW's state exists).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GIB = 2**30


def phases(base, ctx: int, offload: bool) -> dict:
    from scca_eval.attention.register import apply_pattern
    from scca_eval.bench.attention import pattern_from_label
    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing, keep_activations_in
    from scca_eval.training.recipe import Recipe

    apply_pattern(base, pattern_from_label("full"))
    recipe = Recipe(ctx=ctx, batch_size=1, grad_accum=1, warmup_steps=0, offload_activations=offload,
                    gradient_checkpointing=True, cuda_graphs=False)
    model = attach_lora(base, recipe, "random")
    hook = keep_activations_in(model, torch.bfloat16)
    enable_gradient_checkpointing(model)
    try:
        return _measure(model, base, ctx, recipe)
    finally:
        hook.remove()
        model.unload()


def _measure(model, base, ctx: int, recipe) -> dict:
    from scca_eval.training.loop import Trainer
    from scca_eval.training.windows import TrainingStream

    ids = np.random.default_rng(0).integers(0, base.config.vocab_size, size=2 * ctx).astype(np.int64)
    trainer = Trainer(model, TrainingStream(ids, ctx, None, [], "random"), recipe, torch.device("cuda"),
                      torch.bfloat16)
    seen = {}

    def before_optimizer(optimizer, args, kwargs):
        torch.cuda.synchronize()
        seen["forward_backward_peak"] = torch.cuda.max_memory_allocated() / GIB
        seen["gradients_held"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()

    trainer.optimizer.register_step_pre_hook(before_optimizer)
    for _ in range(2):  # the second step has AdamW's state from the first
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        seen["before_step"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
        torch.cuda.synchronize()
        seen["optimizer_peak"] = torch.cuda.max_memory_allocated() / GIB
    return {key: round(value, 2) for key, value in seen.items()}


def main() -> None:
    from scca_eval.bench import random_model
    from scca_eval.bench.train import _restore

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "train_memory.json")
    ctxs = [int(c) for c in sys.argv[2:]] or [8192, 32768]
    base = random_model("llama2-7b", device=torch.device("cuda"), dtype=torch.bfloat16, max_ctx=max(ctxs))
    weights = sum(p.numel() * p.element_size() for p in base.parameters()) / GIB
    original = {name: p.detach().to("cpu", copy=True) for name, p in base.named_parameters()
                if "embed" in name or "norm" in name}
    rows = []
    for ctx in ctxs:
        for offload in (True, False):
            row = {"ctx": ctx, "offload_activations": offload, "bf16_weights_gib": round(weights, 2)}
            try:
                row.update(phases(base, ctx, offload))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            print(json.dumps(row), flush=True)
            rows.append(row)
            _restore(base, torch.bfloat16, original)  # the shared model as it was before the cell
            torch.cuda.empty_cache()
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
