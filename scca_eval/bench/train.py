"""Fine-tuning throughput and memory: the finetune step against the loop a user writes today.

``train_bench`` builds a model of a named shape with random weights once, and for each
ctx times, in the same process, on the same random window (one window per step, LoRA on
q/k/v/o plus trainable embeddings and norms; the step finetune's auto would take at the
largest ctx, decided once on the full-attention model, unless ``gradient_checkpointing`` or
``cuda_graphs`` says otherwise; the baseline checkpoints where the finetune cells do):

- ``baseline``: peft + transformers with SDPA attention, ``model(ids, labels=ids).loss``,
  backward, AdamW — the weights as loaded (bf16 on a GPU), LoRA in peft's float32;
- ``finetune`` under each pattern (and each attention backend asked for): ``scca_eval.training``'s
  step (float32 trained weights under autocast, the chunked checkpointed loss, the pattern's
  kernels, and on a GPU the saved activations placed as ``offload_activations`` says, by
  default "auto": in host memory only where keeping them on the GPU would not fit).

Each cell runs warm-up steps, then timed steps; it reports tokens/s, peak device memory
(``max_memory_allocated`` from just before its first step: weights, optimizer state and
activations), the first step's loss (baseline and full attention must agree: the
same model on the same window) and the ratios the fine-tuning goals are stated in. With
``profile_dir``, one more step of each cell runs under torch.profiler: the row gets the
host's and the GPU's busy time in that step (a step whose GPU busy time is well below its
wall time leaves the GPU waiting on the host), that GPU time split into kernel classes, and
for a sparse pattern the bounds ``profiling.speed_bounds`` derives from it against full
attention; the op tables go to a file. The host time is the profiler's sum over threads,
with its own overhead, so it can exceed the step.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..evaluation.engine import run_eagerly
from ..errors import UserError, is_out_of_memory
from .attention import pattern_from_label
from .profiling import make_profile_dir, markdown_breakdown, profile_step, speed_bounds
from .model import (DEFAULT_PATTERNS, SHAPES, _linear_params, _peak_memory, _reset_peak, attention_flops,
                    auto_kernel, backend_label, random_model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trained_in_full(base) -> dict[str, torch.Tensor]:
    """Copies of the weights every cell trains in full (embeddings, norms), to put back after it
    (in host memory: they are not part of any cell's peak)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in base.named_parameters()
            if "embed" in name or "norm" in name}


def _restore(base, dtype: torch.dtype, original: dict[str, torch.Tensor]) -> None:
    """Undo what a cell did to the shared base model (trained weights, trainable flags, float32
    copies, checkpointing), so that every cell starts from the same weights."""
    for name, parameter in base.named_parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
        if parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
        if name in original:
            with torch.no_grad():
                parameter.copy_(original[name])
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()


def _baseline_cell(base, ids, steps: int, warmup: int, device, dtype, original, profile_to=None,
                   checkpointing: bool = True) -> dict:
    """The loop a user writes: peft + transformers (SDPA) + gradient checkpointing (where asked)."""
    from peft import LoraConfig, get_peft_model

    from ..attention.register import apply_pattern
    from ..training.lora import enable_gradient_checkpointing

    apply_pattern(base, pattern_from_label("full"))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for name, parameter in model.named_parameters():
        if "embed" in name or "norm" in name:
            parameter.requires_grad_(True)
    base.config.use_cache = False
    if checkpointing:
        enable_gradient_checkpointing(model)  # transformers' own, under whichever name this version gives it
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    try:
        return _timed(step, steps, warmup, device, profile_to)
    finally:
        del optimizer
        model.unload()
        _restore(base, dtype, original)


def _finetune_cell(base, ids, spec, steps: int, warmup: int, device, dtype, original, offload,
                   backend: str = "auto", profile_to: Path | None = None, checkpointing: bool = True,
                   cuda_graphs: bool = False) -> dict:
    from ..attention.register import apply_pattern
    from ..training.lora import attach_lora, enable_gradient_checkpointing, keep_activations_in
    from ..training.loop import Trainer
    from ..training.recipe import Recipe
    from ..training.windows import TrainingStream

    ctx = ids.shape[1]
    apply_pattern(base, spec, backend=backend)
    recipe = Recipe(ctx=ctx, batch_size=1, grad_accum=1, warmup_steps=0, offload_activations=offload,
                    gradient_checkpointing=checkpointing, compile=cuda_graphs, cuda_graphs=cuda_graphs)
    model = attach_lora(base, recipe, "random")
    hook = keep_activations_in(model, dtype) if dtype != torch.float32 else None
    if checkpointing:
        enable_gradient_checkpointing(model)
    stream = TrainingStream(ids[0].cpu().numpy().astype(np.int64), ctx, None, [], "random")
    trainer = Trainer(model, stream, recipe, device, None if dtype == torch.float32 else dtype)
    try:
        # A compiled cell's first pass runs eagerly and the next one compiles: both warm up.
        timed = _timed(lambda: trainer.step()["loss"], steps, warmup + trainer.eager_passes_left, device, profile_to)
        timed["activations"] = trainer.activations.describe()
        return timed
    finally:
        if hook is not None:
            hook.remove()
        del trainer
        model.unload()
        _restore(base, dtype, original)


def _plan_step(base, asked, device, dtype, original):
    """auto's step for the finetune cells (training/step_plan.py), decided at the largest ctx on the
    full-attention model, as finetune decides for a run."""
    from ..attention.register import apply_pattern
    from ..training.lora import attach_lora, keep_activations_in
    from ..training.step_plan import plan_for_model, plan_step

    if "auto" not in (asked.gradient_checkpointing, asked.cuda_graphs):
        return plan_step(asked, device, single_process=True, predict=None, trainable=[])
    apply_pattern(base, pattern_from_label("full"))
    model = attach_lora(base, asked, "random")
    autocast = None if dtype == torch.float32 else dtype
    hook = keep_activations_in(model, dtype) if autocast is not None else None
    try:
        return plan_for_model(asked, model, device, autocast)
    finally:
        if hook is not None:
            hook.remove()
        model.unload()
        _restore(base, dtype, original)


def _timed(step: Callable[[], float], steps: int, warmup: int, device, profile_to: Path | None = None) -> dict:
    _reset_peak(device)
    first_loss = None
    for _ in range(warmup):
        loss = step()
        first_loss = loss if first_loss is None else first_loss
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - started)
        first_loss = loss if first_loss is None else first_loss
    timed = {"times_s": times, "seconds": float(np.median(times)), "first_loss": first_loss,
             "peak_memory_gib": _peak_memory(device)}
    if profile_to is not None:
        timed["profile"] = profile_step(step, device, profile_to)
    return timed


def train_bench(shape: str = "llama2-7b", ctxs: Sequence[int] = (8192, 32768),
                patterns: Sequence[str] = DEFAULT_PATTERNS, *, device: torch.device | None = None,
                dtype: torch.dtype | None = None, steps: int = 1, warmup: int = 1, baseline: bool = True,
                compile: bool = False, offload_activations: bool | str = "auto", backends: Sequence[str] = ("auto",),
                gradient_checkpointing: bool | str = "auto", cuda_graphs: bool | str = "auto",
                layers: int | None = None, seed: int = 0, profile_dir: str | Path | None = None,
                log: Callable[[str], None] | None = print) -> dict:
    """Baseline and finetune-step throughput and memory for each ctx and pattern (one window a step).

    backends: attention backends the sparse patterns are timed on, one cell each (full
    attention always runs on SDPA, once). profile_dir: a folder for one profiled step per
    cell (``CTX-PATH-PATTERN-BACKEND.txt``). gradient_checkpointing: False keeps every
    activation instead of recomputing each layer's forward in the backward pass (baseline and
    finetune cells alike). cuda_graphs: the finetune cells' compiled layers replay as CUDA
    graphs (implies compile and no checkpointing; needs a CUDA device, no offloading). "auto"
    for either decides as finetune does (training/step_plan.py), once, at the largest ctx.
    """
    from ..training.recipe import Recipe

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    say = log or (lambda _text: None)
    if shape not in SHAPES and not str(shape).endswith(".json"):
        raise UserError(f"bench train builds random weights: --shape takes a named shape or a config .json, not {shape!r}")
    if cuda_graphs is True and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA GPU; bench without it here")
    # the same refusals as finetune's
    asked = Recipe(ctx=max(ctxs), compile=compile or cuda_graphs is True, cuda_graphs=cuda_graphs,
                   gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations)
    asked.check()
    specs = {label: pattern_from_label(label) for label in patterns}
    profile_dir = make_profile_dir(profile_dir)

    def profile_to(ctx: int, path: str, label: str, backend: str) -> Path | None:
        return None if profile_dir is None else profile_dir / f"{ctx}-{path}-{label}-{backend}.txt"

    base = random_model(shape, device=device, dtype=dtype, max_ctx=max(ctxs), layers=layers, seed=seed)
    body, head = _linear_params(base)
    original = _trained_in_full(base)
    plan = _plan_step(base, asked, device, dtype, original)
    chosen = plan.recipe
    gradient_checkpointing, cuda_graphs = chosen.gradient_checkpointing, chosen.cuda_graphs
    compile, offload_activations = chosen.compile, chosen.offload_activations
    if compile:  # the decoder layers, once: every finetune cell runs them compiled, the baseline eagerly
        from ..training.lora import compile_layers

        compile_layers(base, cuda_graphs=cuda_graphs)
    result = {"shape": shape, "layers": base.config.num_hidden_layers, "dtype": str(dtype).removeprefix("torch."),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "steps": steps, "warmup": warmup, "compiled": compile,
              "offload_activations": offload_activations, "backends": list(backends),
              "gradient_checkpointing": gradient_checkpointing, "cuda_graphs": cuda_graphs,
              "step": plan.describe(), "window_per_step": 1, "rows": []}
    say(f"bench train: {shape} ({base.config.num_hidden_layers} layers, random weights, {dtype}), one window "
        f"per step, {warmup} warm-up + {steps} timed step(s) per cell; step: {result['step']['step']} "
        f"({plan.reason})")
    rng = np.random.default_rng(seed)
    for ctx in ctxs:
        ids = torch.from_numpy(rng.integers(0, base.config.vocab_size, size=(1, ctx))).long().to(device)
        def baseline_cell():
            with run_eagerly() if compile else contextlib.nullcontext():
                return _baseline_cell(base, ids, steps, warmup, device, dtype, original,
                                      profile_to(ctx, "baseline", "full", "sdpa"), gradient_checkpointing)

        cells = [("baseline", "full", "sdpa", baseline_cell)] if baseline else []
        for label, spec in specs.items():
            for backend in (["sdpa"] if spec.is_full else backends):
                cells.append(("finetune", label, backend,
                              lambda label=label, spec=spec, backend=backend: _finetune_cell(
                                  base, ids, spec, steps, warmup, device, dtype, original, offload_activations,
                                  "auto" if backend == "sdpa" else backend,
                                  profile_to(ctx, "finetune", label, backend), gradient_checkpointing,
                                  cuda_graphs)))
        for path, label, backend, run in cells:
            row = {"ctx": ctx, "path": path, "pattern": label, "backend": backend, "error": None}
            if path == "finetune":
                row["kernel"] = auto_kernel(base.config, specs[label], backend, ctx, device, dtype, backward=True)
            try:
                row.update(run())
                row["tokens_per_s"] = ctx / row["seconds"]
            except RuntimeError as error:  # torch.OutOfMemoryError, or a library's failed allocation
                if not is_out_of_memory(error):
                    raise
                row["error"] = "out of memory"
                _restore(base, dtype, original)
            row["linear_flops"] = 2.0 * (body + head) * ctx
            row["attention_flops"] = attention_flops(base, specs.get(label, pattern_from_label("full")), ctx)
            result["rows"].append(row)
            say(_line(row, device.type == "cuda"))
            _reset_peak(device)
    _add_ratios(result)
    return result


def _backend_label(row: dict) -> str:
    return backend_label(row.get("backend", ""), row.get("kernel"))


def _offloaded(row: dict, on_gpu: bool) -> str:
    """How the row's activations waited: "host", "GPU", or "" (the baseline keeps them where it
    computes; off a GPU there is nowhere else)."""
    activations = row.get("activations")
    if not activations or not on_gpu:
        return ""
    return "host" if activations.get("offloaded") else "GPU"


def _line(row: dict, on_gpu: bool) -> str:
    head = f"  ctx {row['ctx']:>6} {row['path']:<9} {row['pattern']:<11} {_backend_label(row):<8}"
    if row["error"]:
        return f"{head} {row['error']}"
    memory = f", peak {row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else ""
    placed = _offloaded(row, on_gpu)
    place = f", activations on the {placed}" if placed else ""
    profiled = row.get("profile")
    busy = ""
    if profiled:
        gpu = f", GPU {profiled['gpu_ms']:.1f} ms" if profiled["gpu_ms"] is not None else ""
        busy = f", profiled step: host {profiled['host_ms']:.1f} ms{gpu}"
    return (f"{head} {row['seconds']:.3f} s/step, {row['tokens_per_s']:,.0f} tok/s{memory}{place}, "
            f"loss {row['first_loss']:.4f}{busy}")


def _add_ratios(result: dict) -> None:
    """vs baseline (same ctx), vs full finetune (same ctx), and the speed a sparse pattern should reach:
    at least half of what its attention-FLOP saving allows (the evaluation goals' rule)."""
    rows = result["rows"]
    for row in rows:
        if row["error"]:
            continue
        same = {(r["path"], r["pattern"]): r for r in rows if r["ctx"] == row["ctx"] and not r["error"]}
        base, full = same.get(("baseline", "full")), same.get(("finetune", "full"))
        if row["path"] == "finetune" and base:
            row["speed_vs_baseline"] = row["tokens_per_s"] / base["tokens_per_s"]
            if row["peak_memory_gib"] and base["peak_memory_gib"]:
                row["memory_vs_baseline"] = row["peak_memory_gib"] / base["peak_memory_gib"]
        if row["path"] == "finetune" and full and row["pattern"] != "full":
            allowed = (full["linear_flops"] + full["attention_flops"]) / (row["linear_flops"] + row["attention_flops"])
            row["speed_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]
            row["goal_vs_full"] = 1 + (allowed - 1) / 2
            if row.get("profile", {}).get("busy_ms") is not None and full.get("profile", {}).get("busy_ms") is not None:
                row["bounds"] = speed_bounds(1000 * row["seconds"], row["profile"], 1000 * full["seconds"],
                                             full["profile"], row["attention_flops"] / full["attention_flops"])


def markdown_train(result: dict) -> str:
    settings = "gradient checkpointing" if result.get("gradient_checkpointing", True) else "no gradient checkpointing"
    offload = result.get("offload_activations")
    if offload is True:
        settings += ", finetune's activations offloaded to host memory"
    elif offload == "auto":
        settings += ", finetune's activations offloaded only where keeping them would not fit (column 'acts')"
    if result.get("compiled"):
        settings += ", finetune's decoder layers compiled"
        if result.get("cuda_graphs"):
            settings += " and replayed as CUDA graphs"
    if result.get("step") and result["step"]["reason"] != "as asked":
        settings += f" (auto's step: {result['step']['reason']})"
    lines = [f"Fine-tuning step, {result['shape']} ({result['layers']} layers, random weights), {result['dtype']}, "
             f"{result['device']}, torch {result['torch']}; one window per step, LoRA q/k/v/o + embed + norm, "
             f"{settings}; {result['warmup']} warm-up + {result['steps']} timed step(s) (median).", "",
             "| ctx | path | pattern | backend | acts | s/step | tok/s | peak GiB | vs baseline | memory vs baseline "
             "| vs full | goal vs full | first loss |",
             "| ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    profiled = any(r.get("profile") for r in result["rows"])
    if profiled:  # the busy times of one more, profiled step
        lines[-2] += " host ms | GPU ms |"
        lines[-1] += " ---: | ---: |"
    on_gpu = result["device"] != "cpu"
    for r in result["rows"]:
        head = f"| {r['ctx']} | {r['path']} | {r['pattern']} | {_backend_label(r)} | {_offloaded(r, on_gpu)} |"
        if r["error"]:
            lines.append(f"{head} {r['error']} | | | | | | | |" + (" | |" if profiled else ""))
            continue

        def ratio(key):
            return f"{r[key]:.2f}x" if key in r else ""

        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
        lines.append(f"{head} {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{memory} | {ratio('speed_vs_baseline')} | {ratio('memory_vs_baseline')} | "
                     f"{ratio('speed_vs_full')} | {ratio('goal_vs_full')} | {r['first_loss']:.4f} |")
        if profiled:
            busy = r.get("profile") or {}
            gpu = busy.get("gpu_ms")
            lines[-1] += (f" {busy['host_ms']:.1f} |" if busy else " |") + (f" {gpu:.1f} |" if gpu is not None else " |")
    cells = [dict(r, step_ms=1000 * r["seconds"], backend=_backend_label(r) + (" (baseline)" if r["path"] == "baseline"
                                                                                else ""))
             for r in result["rows"] if not r["error"] and (r.get("profile") or {}).get("busy_ms") is not None]
    if cells:
        lines += ["", markdown_breakdown(cells, "step").rstrip("\n")]
    return "\n".join(lines) + "\n"
