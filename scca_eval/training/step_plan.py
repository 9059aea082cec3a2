"""Which fine-tuning step runs when the recipe leaves it to ``"auto"``: the fastest that fits.

On one CUDA GPU the fastest step keeps every activation for the backward pass (no gradient
checkpointing) and replays each compiled decoder layer as a CUDA graph: the host launches one
graph a layer instead of every kernel, where the eager step leaves the GPU waiting on the host
(benchmarks/README.md). That step holds the activations of every layer at once, so auto takes
it only where they fit, and otherwise the checkpointed step (LongLoRA's).

The memory is predicted before training, from the model itself: forward passes over three
short windows (ctx/64, ctx/32, ctx/16 tokens; whole multiples of a fixed chunk size) under
autograd count the bytes autograd keeps for the backward pass (distinct storages; parameters
excluded, they are resident anyway), and a quadratic through the three counts, or the line
through the last two where that is higher, gives the bytes at ctx. The probes run the
attention kernel that auto would choose at ctx, not at their own length. Nothing is trained
by the probes: no backward pass runs and the random state is restored. The fast step is
taken when

    allocated now + activations at ctx + gradients + AdamW's two moments
        <= FAST_STEP_SHARE x the memory at hand

(at hand: what this process has reserved plus what the GPU has free, or ``max_memory_gib``
where that is smaller). Without probing, auto takes the checkpointed step off a CUDA GPU
(CUDA graphs need one), with several processes (the fast step was never measured across
processes), where torch.compile has no GPU code generator (Triton), and where an option rules
the fast step out (``--gradient-checkpointing``, ``--no-cuda-graphs``, ``--offload-activations
on``); a probe that runs out of memory means the checkpointed step too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from ..attention.auto import choosing_for_length
from ..attention.register import pattern_of
from ..errors import is_out_of_memory
from .offload import GIB, adam_state_bytes
from .recipe import Recipe

# The first pass of a compiled run runs eagerly, in the caching allocator's pool; the CUDA graphs
# that follow allocate from a pool of their own, and both may hold memory at once. Half of what
# is at hand leaves room for that and for the allocator's slack.
FAST_STEP_SHARE = 0.5

PROBE_FRACTIONS = (64, 32, 16)  # probe windows: ctx / each


def saved_bytes(forward: Callable[[], torch.Tensor], parameters=()) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``forward()``: each storage
    once, leaving out parameters and views of them (``parameters``: the model's, e.g. the frozen
    weight a linear layer saves as a transposed view). No backward pass runs; afterwards nothing
    the forward saved is kept alive."""
    resident = {p.untyped_storage().data_ptr() for p in parameters}
    kept: list[torch.Tensor] = []  # alive until the forward is done, so no storage is reused meanwhile
    storages: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        if not isinstance(tensor, torch.nn.Parameter) and storage.data_ptr() not in resident:
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        kept.append(tensor)
        # an index, not the tensor: a saved output that held itself would be a reference cycle
        # through its own graph, which no backward pass would ever break
        return len(kept) - 1

    def unpack(_index: int):
        raise RuntimeError("the memory probe runs no backward pass")

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            forward()
    finally:
        # every saved tensor holds this hook and so ``kept``: a cycle the collector may never free,
        # unless broken here (also where the forward raised, out of memory say)
        kept.clear()
    return sum(storages.values())


def probe_lengths(ctx: int, chunk_size: int | None = None) -> list[int]:
    """The short windows the probes run: ctx/64, ctx/32, ctx/16 (ctx itself where that is too short
    to give three lengths). A pattern with a fixed chunk size G gets whole multiples of G, so that
    a probe holds chunks as the window does, not one partial chunk: each length rounded up to a
    multiple of G, or G, 2G, 3G where that rounding leaves fewer than three (ctx itself where 3G
    is not shorter than ctx)."""
    lengths = sorted({ctx // fraction for fraction in PROBE_FRACTIONS})
    if chunk_size is not None and chunk_size > 1:
        lengths = sorted({-(-length // chunk_size) * chunk_size for length in lengths})
        if len(lengths) < 3:
            lengths = [chunk_size, 2 * chunk_size, 3 * chunk_size] if 3 * chunk_size < ctx else [ctx]
    return lengths if len(lengths) == 3 and lengths[0] >= 2 else [ctx]


def extrapolate(lengths: list[int], counts: list[int], ctx: int) -> int:
    """Bytes at ``ctx`` from counts at shorter lengths: the quadratic through three points or the
    line through the last two, whichever is higher (one point: that count)."""
    if len(lengths) == 1:
        return counts[0]
    (x1, x2, x3), (y1, y2, y3) = lengths, counts
    line = y3 + (y3 - y2) * (ctx - x3) / (x3 - x2)
    # Lagrange form of the quadratic through the three points
    quadratic = (y1 * (ctx - x2) * (ctx - x3) / ((x1 - x2) * (x1 - x3))
                 + y2 * (ctx - x1) * (ctx - x3) / ((x2 - x1) * (x2 - x3))
                 + y3 * (ctx - x1) * (ctx - x2) / ((x3 - x1) * (x3 - x2)))
    return int(max(line, quadratic, y3))


def predict_activation_bytes(window_loss: Callable[[torch.Tensor], torch.Tensor], ctx: int, batch_size: int,
                             device: torch.device, autocast_dtype: torch.dtype | None,
                             chunk_size: int | None = None) -> dict:
    """What a pass of ``batch_size`` windows of ``ctx`` tokens keeps for its backward without
    checkpointing, from probes on shorter windows (``window_loss``: token ids in, a loss out;
    ``chunk_size``: the pattern's fixed chunk size G, if it has one)."""
    lengths = probe_lengths(ctx, chunk_size)
    counts = []
    parameters = []
    if isinstance(window_loss, torch.nn.Module):
        window_loss.train()  # as the trainer runs it
        parameters = list(window_loss.parameters())
    devices = [device] if device.type == "cuda" else []
    # LoRA dropout draws from the random state; training must not notice. Attention's auto runs
    # the kernel it would at ctx: kernels differ in what they keep for the backward pass.
    with torch.random.fork_rng(devices=devices), choosing_for_length(ctx):
        for length in lengths:
            ids = torch.zeros((batch_size, length), dtype=torch.long, device=device)
            autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                        else torch.autocast(device.type, enabled=False))
            with autocast:
                counts.append(saved_bytes(lambda: window_loss(ids), parameters))
    return {"probe_lengths": lengths, "probe_bytes": counts, "bytes": extrapolate(lengths, counts, ctx)}


@dataclass
class StepPlan:
    """The step a run takes: the recipe with auto's choices made, and why."""

    recipe: Recipe
    reason: str
    prediction: dict | None = None  # bytes, as predicted (None where auto did not probe)

    def describe(self) -> dict:
        """What training.json records about it (runtime.step)."""
        chosen = self.recipe
        step = ("CUDA graphs, no checkpointing" if chosen.cuda_graphs else
                ("compiled, " if chosen.compile else "eager, ") +
                ("checkpointed" if chosen.gradient_checkpointing else "no checkpointing"))
        described = {"step": step, "reason": self.reason}
        for key, value in (self.prediction or {}).items():
            if key.endswith("_bytes"):
                described[key.removesuffix("_bytes") + "_gib"] = round(value / GIB, 3)
            elif key != "fits":
                described[key] = value
        return described


def plan_step(recipe: Recipe, device: torch.device, *, single_process: bool,
              predict: Callable[[], dict] | None, trainable: list[torch.nn.Parameter]) -> StepPlan:
    """The recipe with every ``"auto"`` of gradient_checkpointing and cuda_graphs decided.

    predict: runs the probes (``predict_activation_bytes`` bound to the model), called only where
    auto has to decide on a CUDA GPU."""
    checkpointing, graphs = recipe.gradient_checkpointing, recipe.cuda_graphs
    if graphs is True:  # asked for: they need every activation kept on the GPU
        return StepPlan(_resolved(recipe, checkpointing=False, graphs=True), "--cuda-graphs")
    if checkpointing != "auto" and graphs != "auto":
        return StepPlan(recipe, "as asked")
    # the step otherwise: checkpointed, unless --no-gradient-checkpointing said not
    fallback = _resolved(recipe, checkpointing=True if checkpointing == "auto" else checkpointing, graphs=False)
    why_not = _why_no_fast_step(recipe, device, single_process)
    if why_not is None:
        try:
            prediction = predict()
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            why_not = "a probe window ran out of GPU memory"  # even a short window's activations do not fit
        if why_not is not None:
            # out here: until the except block ends, its traceback holds the failed probe's
            # tensors, which empty_cache could not hand back
            torch.cuda.empty_cache()
    if why_not is not None:
        return StepPlan(fallback, why_not)
    free, _total = torch.cuda.mem_get_info(device)
    verdict = fast_step_verdict(prediction, allocated=torch.cuda.memory_allocated(device), trainable=trainable,
                                at_hand=torch.cuda.memory_reserved(device) + free,
                                max_memory_gib=recipe.max_memory_gib)
    if verdict["fits"]:
        return StepPlan(_resolved(recipe, checkpointing=False, graphs=True), verdict.pop("reason"), verdict)
    return StepPlan(fallback, verdict.pop("reason"), verdict)


def plan_for_model(recipe: Recipe, peft_model, device: torch.device, autocast_dtype: torch.dtype | None, *,
                   single_process: bool = True) -> StepPlan:
    """``plan_step`` for a LoRA model as the trainer will run it: its training forward pass
    (``loop.WindowLoss``) probed at the recipe's ctx and batch size, its trained weights."""
    from .lora import trainable_parameters
    from .loop import WindowLoss

    pattern = pattern_of(peft_model)
    return plan_step(recipe, device, single_process=single_process,
                     predict=lambda: predict_activation_bytes(WindowLoss(peft_model, recipe.loss_chunk), recipe.ctx,
                                                              recipe.batch_size, device, autocast_dtype,
                                                              pattern.chunk_size if pattern is not None else None),
                     trainable=list(trainable_parameters(peft_model).values()))


def _why_no_fast_step(recipe: Recipe, device: torch.device, single_process: bool) -> str | None:
    """Why the step with CUDA graphs is out of the question without probing (None: it may fit)."""
    if device.type != "cuda":
        return "not on a CUDA GPU"
    if not single_process:
        return "several processes"
    if recipe.gradient_checkpointing is True:
        return "--gradient-checkpointing"
    if recipe.cuda_graphs is False:
        return "--no-cuda-graphs"
    if recipe.offload_activations is True:
        return "--offload-activations on"
    if not compiler_available(device):
        return "torch.compile cannot build GPU kernels here (it needs Triton and compute capability 7.0 or higher)"
    return None


def compiler_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for this CUDA device (its GPU code generator,
    Triton, supports compute capability 7.0 and higher)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (7, 0)


def fast_step_verdict(prediction: dict, *, allocated: int, trainable: list[torch.nn.Parameter], at_hand: int,
                      max_memory_gib: float | None) -> dict:
    """Whether the step that keeps every activation fits (bytes in, bytes out): what is allocated
    now, the predicted activations, the trainable weights' gradients and AdamW's two moments,
    against FAST_STEP_SHARE of the memory at hand (or of max_memory_gib where that is smaller)."""
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    need = allocated + prediction["bytes"] + gradients + adam_state_bytes(trainable)
    if max_memory_gib is not None:
        at_hand = min(at_hand, int(max_memory_gib * GIB))
    fits = need <= FAST_STEP_SHARE * at_hand
    reason = (f"every activation fits: about {need / GIB:.1f} GiB needed, at most {FAST_STEP_SHARE:.0%} of "
              f"{at_hand / GIB:.1f} GiB at hand" if fits else
              f"keeping every activation needs about {need / GIB:.1f} GiB, more than {FAST_STEP_SHARE:.0%} of "
              f"{at_hand / GIB:.1f} GiB at hand")
    return {"fits": fits, "reason": reason, "activations_bytes": prediction["bytes"], "need_bytes": need,
            "at_hand_bytes": at_hand, "probe_lengths": prediction["probe_lengths"],
            "probe_gib": [round(count / GIB, 4) for count in prediction["probe_bytes"]]}


def _resolved(recipe: Recipe, *, checkpointing: bool, graphs: bool) -> Recipe:
    changes = {"gradient_checkpointing": checkpointing, "cuda_graphs": graphs}
    if graphs:
        changes.update(compile=True, offload_activations=False)
    return dataclasses.replace(recipe, **changes)
