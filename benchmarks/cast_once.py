"""The fine-tuning step with each activation cast to the compute dtype once where it is made
(``keep_activations_in``) against autocast casting it for every reader (only the embedding's
output cast, peft's LoRA input casts on): the same model, the same windows, one process.

    python benchmarks/cast_once.py [--model default | --shape smollm2-135m] [--ctx 128] [--steps 10]
                                   [--data FILE] [--layers N] [--device cpu|cuda] [--json FILE]

For each variant it reports the losses of ``--steps`` AdamW steps (lr 2e-4) from the same
start, the cast ops of one step (the profiler's count of ``aten::_to_copy``), and the median
seconds per step but the first (on a GPU; on a CPU bfloat16 matrix products dominate and the
times say nothing about casts). Frozen weights bfloat16, trained ones float32, gradient
checkpointing, full attention. The step is a plain peft one (``model(ids, labels=ids).loss``),
not the project's trainer with its chunked loss: ``scca-eval bench train`` times that.
``--model default`` is the embedded SmolLM2-135M with ``--data`` text; a ``--shape`` has random
weights and trains on random tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def build(args, device):
    from scca_eval.bench.model import random_model
    from scca_eval.models import load_model

    torch.manual_seed(0)
    if args.shape:
        model = random_model(args.shape, device=device, dtype=torch.bfloat16, max_ctx=args.ctx, layers=args.layers)
        ids = torch.randint(0, model.config.vocab_size, (args.steps, 1, args.ctx), generator=torch.Generator().manual_seed(1))
        return model, ids
    model, tokenizer = load_model(args.model, dtype="bfloat16", device=str(device))
    with open(args.data, encoding="utf-8") as handle:
        tokens = tokenizer(handle.read(200_000))["input_ids"]
    if len(tokens) < args.ctx * args.steps:
        sys.exit(f"cast_once.py: {args.data} has {len(tokens)} tokens; give --steps x --ctx or fewer")
    return model, torch.tensor(tokens[: args.ctx * args.steps]).view(args.steps, 1, args.ctx)


def run(args, device, once: bool) -> dict:
    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing, keep_activations_in
    from scca_eval.training.recipe import Recipe

    base, ids = build(args, device)
    model = attach_lora(base, Recipe(ctx=args.ctx), "cast_once")
    if once:
        keep_activations_in(model, torch.bfloat16)
    else:  # what autocast does alone, with a bfloat16 residual stream
        model.get_base_model().get_input_embeddings().register_forward_hook(lambda m, i, out: out.to(torch.bfloat16))
    enable_gradient_checkpointing(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-4, weight_decay=0.0)

    def step(window):
        window = window.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=window, labels=window).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step

    losses, seconds = [], []
    for window in ids:
        start = time.perf_counter()
        losses.append(step(window))
        seconds.append(time.perf_counter() - start)
    with torch.profiler.profile() as profile:
        step(ids[-1])
    casts = sum(event.count for event in profile.key_averages() if event.key == "aten::_to_copy")
    return {"losses": losses, "casts_per_step": casts,
            "median_step_s": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--shape", help="a bench shape (random weights) instead of --model")
    parser.add_argument("--data")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.shape and args.data is None:
        sys.exit("cast_once.py: --model needs --data FILE (text to train on)")
    device = torch.device(args.device)
    result = {"model": args.shape or args.model, "ctx": args.ctx, "steps": args.steps, "device": str(device),
              "per_reader": run(args, device, once=False), "once": run(args, device, once=True)}
    per_reader, once = result["per_reader"], result["once"]
    for name in ("per_reader", "once"):
        row = result[name]
        print(f"{name:>10}: casts/step {row['casts_per_step']}, median step {row['median_step_s']:.4f} s, "
              f"losses {' '.join(f'{x:.4f}' for x in row['losses'])}")
    print(f"largest loss difference {max(abs(a - b) for a, b in zip(per_reader['losses'], once['losses'])):.4f}; "
          f"first step equal: {per_reader['losses'][0] == once['losses'][0]}; "
          f"step time once vs per reader {per_reader['median_step_s'] / once['median_step_s']:.3f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
