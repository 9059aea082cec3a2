"""Fine-tuning on several GPUs: tokens/s per GPU against one GPU, replicated and sharded, and
the memory of a 70B-shaped LoRA step under FSDP2.

    python benchmarks/train_parallel.py scaling --gpus 8 [--shape llama2-7b] [--ctx 8192] [--json OUT]
    python benchmarks/train_parallel.py memory-70b --gpus 8 [--ctx 8192] [--json OUT]

``scaling`` runs the `scca-eval finetune` step (LoRA q/k/v/o + embeddings + norms, gradient
checkpointing, activations offloaded, bf16 frozen weights, one window per pass) on a model of
``--shape`` with random weights: once on one GPU (one pass per step), then with ``--gpus N``
processes replicated (each GPU holds the whole model, ``finetune --gpus N``) and sharded
(``finetune --gpus N --shard``, FSDP2), N passes per step, one per GPU. It reports seconds per
step, tokens/s per GPU, the ratio to one GPU, and the peak memory of the busiest GPU.

``memory-70b`` runs the sharded step on the LLaMA-2-70B shape. The model is created on the meta
device, sharded, and only each GPU's shards are allocated and filled with random values, so the
70B model never exists whole anywhere. It reports, per phase of the second step (AdamW's state
exists then), the largest figure over the GPUs: memory allocated before the step, the peak of
the forward and backward passes, and the peak of the optimizer step; and tokens/s per GPU.
docs/scaling.md estimates these figures.

The script starts its own processes (torchrun's code, one per GPU); each run is a separate
launch, so no run's memory carries into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


# ---------------------------------------------------------------- one launch (every rank runs this)

def _random_fill(peft_model) -> None:
    """Random values in this rank's shards (norms at 1), and the rotary buffers computed afresh."""
    import torch
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02)
        for module in peft_model.modules():
            if hasattr(module, "inv_freq") and hasattr(module, "config"):
                fresh = type(module)(module.config)  # the frequencies, computed on the host
                for buffer_name, value in fresh.named_buffers(recurse=False):
                    getattr(module, buffer_name).copy_(value)


def _build(parallel: str, shape: str, ctx: int, device, dtype, world: int):
    """(peft model, sharded root or None): random weights, LoRA, checkpointing, bf16 activations."""
    import torch

    from scca_eval.bench import random_model
    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing, keep_activations_in
    from scca_eval.training.recipe import Recipe
    from scca_eval.training.sharding import shard_empty

    sharded = parallel == "shard"
    # Sharded: the model exists on the meta device only, until each rank allocates its shards.
    base = random_model(shape, device=torch.device("meta") if sharded else device, dtype=dtype, max_ctx=ctx)
    recipe = Recipe(ctx=ctx, batch_size=1, grad_accum=world, warmup_steps=0, gradient_checkpointing=True,
                    cuda_graphs=False)
    model = attach_lora(base, recipe, shape)
    enable_gradient_checkpointing(model)
    if dtype != torch.float32:
        keep_activations_in(model, dtype)
    root = None
    if sharded:
        root = shard_empty(model, device, world, recipe.loss_chunk)
        _random_fill(model)
    return model, root, recipe


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from scca_eval import distributed
    from scca_eval.training.loop import Trainer
    from scca_eval.training.windows import TrainingStream

    ranks, device_name = distributed.setup(args.device)
    device = torch.device(device_name or args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    world = ranks.world_size
    model, root, recipe = _build(args.parallel, args.shape, args.ctx, device, dtype, world)
    vocab = model.get_base_model().config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, size=2 * world * args.ctx).astype(np.int64)
    trainer = Trainer(model, TrainingStream(ids, args.ctx, None, [], "random"), recipe, device,
                      None if dtype == torch.float32 else dtype, ranks=ranks, loss=root, sharded=root is not None)

    cuda = device.type == "cuda"
    phases = {}

    def allocated() -> float | None:
        return torch.cuda.memory_allocated(device) / GIB if cuda else None

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated(device) / GIB if cuda else None

    def before_optimizer(optimizer, *_):
        if cuda:
            torch.cuda.synchronize(device)
            phases["forward_backward_peak_gib"] = peak()
            phases["gradients_held_gib"] = allocated()
            torch.cuda.reset_peak_memory_stats(device)

    trainer.optimizer.register_step_pre_hook(before_optimizer)
    seconds = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        phases["before_step_gib"] = allocated()
        result = trainer.step()
        if cuda:
            torch.cuda.synchronize(device)
        phases["optimizer_peak_gib"] = peak()
        if step >= args.warmup:
            seconds.append(result["seconds"])

    # The busiest GPU: the largest figure of each phase over the ranks (none on CPU).
    memory = dict.fromkeys(PHASES)
    if cuda:
        figures = torch.tensor([phases[k] for k in PHASES], dtype=torch.float64, device=device)
        if ranks.is_distributed:
            dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        memory = dict(zip(PHASES, figures.tolist()))
    if ranks.is_main:
        median = float(np.median(seconds))
        row = {"parallel": args.parallel if world > 1 else "one GPU", "gpus": world, "shape": args.shape,
               "ctx": args.ctx, "steps": args.steps, "warmup": args.warmup, "seconds_per_step": median,
               "tokens_per_step": recipe.windows_per_step * args.ctx,
               "tokens_per_s_per_gpu": recipe.windows_per_step * args.ctx / median / world,
               "memory_max_over_gpus": memory,
               "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__}
        Path(args.result).write_text(json.dumps(row, indent=2) + "\n")
    distributed.teardown()


PHASES = ("before_step_gib", "forward_backward_peak_gib", "gradients_held_gib", "optimizer_peak_gib")


# ---------------------------------------------------------------- the parent: one launch per run

def _launch(parallel: str, gpus: int, args, work: Path) -> dict:
    result = work / f"{parallel}-{gpus}.json"
    worker_args = [str(Path(__file__).resolve()), "worker", "--parallel", parallel, "--shape", args.shape,
                   "--ctx", str(args.ctx), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--result", str(result)] + (["--device", args.device] if args.device else [])
    if gpus == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"running: {' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env)
    if done.returncode != 0 or not result.is_file():
        return {"parallel": parallel, "gpus": gpus, "error": f"exit status {done.returncode}"}
    return json.loads(result.read_text())


def _table(rows: list[dict]) -> str:
    base = next((r for r in rows if r.get("gpus") == 1 and "error" not in r), None)
    lines = ["| GPUs | model | s/step | tokens/s per GPU | vs one GPU | before step GiB | fwd+bwd peak GiB "
             "| optimizer peak GiB |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['parallel']} | {r['error']} | | | | | |")
            continue
        m = {k: "–" if v is None else f"{v:.2f}" for k, v in r["memory_max_over_gpus"].items()}
        ratio = f"{r['tokens_per_s_per_gpu'] / base['tokens_per_s_per_gpu']:.2f}x" if base else ""
        lines.append(f"| {r['gpus']} | {r['parallel']} | {r['seconds_per_step']:.3f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {ratio} | {m['before_step_gib']} | "
                     f"{m['forward_backward_peak_gib']} | {m['optimizer_peak_gib']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("scaling", "memory-70b", "worker"))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--shape", default=None, help="Default: llama2-7b (scaling), llama2-70b (memory-70b).")
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per run (median).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu to check the script on a machine without GPUs.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parallel", choices=("replicate", "shard"), default="replicate")  # worker only
    parser.add_argument("--result", default=None)  # worker only
    args = parser.parse_args()
    if args.what == "worker":
        worker(args)
        return
    args.shape = args.shape or ("llama2-70b" if args.what == "memory-70b" else "llama2-7b")
    work = Path(tempfile.mkdtemp(prefix="scca-eval-train-parallel-"))
    if args.what == "scaling":
        rows = [_launch("replicate", 1, args, work), _launch("replicate", args.gpus, args, work),
                _launch("shard", args.gpus, args, work)]
    else:
        rows = [_launch("shard", args.gpus, args, work)]
    print(json.dumps(rows, indent=2))
    print(_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"what": args.what, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
