"""Where autograd keeps what the backward pass needs: on the GPU, or in pinned host memory.

Under gradient checkpointing, what autograd keeps for the backward pass is mainly each
decoder layer's input (``[batch, ctx, hidden]`` per layer), memory that grows with
ctx × layers. Offloading it (``HostOffload``: torch's ``save_on_cpu``, but each copy keeps
its tensor's layout) frees that memory for a copy each way, which costs time;
``Recipe.offload_activations`` says what to do:

- ``True`` / ``False``: always / never (on a GPU; off a GPU nothing is offloaded).
- ``"auto"`` (the default): offload only where keeping them on the GPU would not fit.
  The first pass of a run runs offloaded — that always fits if anything does — and
  measures what keeping would add:

  * ``saved``: the bytes of the GPU tensors autograd handed to the offload hook, i.e.
    what would have stayed on the GPU (each saved tensor counted, so a tensor saved
    twice counts twice: an upper bound);
  * ``peak``: the pass's peak of the memory PyTorch reserved on the device, forward and
    backward (``max_memory_reserved``, reset at the start of the pass);
  * the optimizer state still to come: before the first optimizer step AdamW holds
    nothing; afterwards two moments of every trainable parameter, resident through
    every later pass.

  Keeping needs ``peak + (saved + state) × overhead``, where ``overhead`` is the pass's
  measured ratio of reserved to allocated memory at the peak (the allocator's slack).
  The memory at hand is what this process has reserved plus what the device has free
  (``torch.cuda.mem_get_info``), or ``max_memory_gib`` where that is smaller. Every
  later pass keeps its activations on the GPU when the need fits, and offloads otherwise.

Offloading changes where tensors wait, not what is computed: the weights after a step are
the same either way (tests/training/test_finetune.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

GIB = 2**30


@dataclass
class Measurement:
    """What the first pass measured and what auto decided from it (bytes)."""

    saved: int
    peak_reserved: int
    peak_allocated: int
    state_to_come: int
    at_hand: int
    max_memory: int | None
    need: int
    offload: bool

    def to_dict(self) -> dict:
        return {"offloaded": self.offload, "measured_on": "the run's first pass (offloaded)",
                **{f"{name}_gib": round(value / GIB, 3) for name, value in (
                    ("kept_activations", self.saved), ("pass_peak_reserved", self.peak_reserved),
                    ("optimizer_state_to_come", self.state_to_come), ("need_if_kept", self.need),
                    ("at_hand", self.at_hand))},
                "max_memory_gib": None if self.max_memory is None else round(self.max_memory / GIB, 3)}

    def describe(self) -> str:
        verdict = "offloading" if self.offload else "keeping"
        limit = f", --max-memory {self.max_memory / GIB:.1f} GiB" if self.max_memory is not None else ""
        return (f"activations: {verdict} them on the host (keeping them on the GPU needs about "
                f"{self.need / GIB:.1f} GiB, {self.at_hand / GIB:.1f} GiB at hand{limit})" if self.offload else
                f"activations: {verdict} them on the GPU (about {self.need / GIB:.1f} GiB needed, "
                f"{self.at_hand / GIB:.1f} GiB at hand{limit})")


def decide(saved: int, peak_reserved: int, peak_allocated: int, state_to_come: int, reserved_now: int, free: int,
           max_memory: int | None) -> Measurement:
    """auto's arithmetic (bytes): keep the activations on the GPU when what keeping needs fits at hand."""
    overhead = peak_reserved / peak_allocated if peak_allocated else 1.0
    need = int(peak_reserved + (saved + state_to_come) * overhead)
    at_hand = reserved_now + free
    if max_memory is not None:
        at_hand = min(at_hand, max_memory)
    return Measurement(saved, peak_reserved, peak_allocated, state_to_come, at_hand, max_memory, need,
                       offload=need > at_hand)


def adam_state_bytes(parameters) -> int:
    """AdamW's two moments (exp_avg, exp_avg_sq): the size and dtype of each trained parameter."""
    return sum(2 * p.numel() * p.element_size() for p in parameters)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """What autograd saves on the GPU waits in pinned host memory until the backward pass.

    torch's ``save_on_cpu`` does the same but hands back contiguous copies, and the backward
    of a compiled layer checks the strides of what it saved: a transposed query that comes
    back contiguous stops the step. So each copy here keeps the layout of its tensor
    (``empty_like``), and a tensor whose layout a copy cannot keep (a broadcast view) stays on
    the GPU, as do parameters (resident anyway). ``saved_bytes`` adds up what was moved.
    """

    def __init__(self):
        self.saved_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda or isinstance(tensor, torch.nn.Parameter):
            return None, tensor
        packed = torch.empty_like(tensor, device="cpu", pin_memory=True)
        if packed.stride() != tensor.stride():
            return None, tensor
        packed.copy_(tensor, non_blocking=True)
        self.saved_bytes += tensor.nbytes
        return tensor.device, packed

    @staticmethod
    def _unpack(packed) -> torch.Tensor:
        device, tensor = packed
        # to() keeps the strides of a dense tensor (torch.preserve_format)
        return tensor if device is None else tensor.to(device, non_blocking=True)


class ActivationPlace:
    """Per pass: ``with place.forward(): ...`` around the forward, ``place.after_pass(...)``
    after the backward. ``measurement`` holds auto's decision once made."""

    def __init__(self, mode: bool | str, device: torch.device, max_memory_gib: float | None = None,
                 notify: Callable[[str], None] | None = None):
        self.mode, self.device, self.notify = mode, device, notify
        self.max_memory = None if max_memory_gib is None else int(max_memory_gib * GIB)
        self.measurement: Measurement | None = None
        self._counter: HostOffload | None = None

    @property
    def active(self) -> bool:
        """Whether there is anything to decide: a GPU and offloading not switched off."""
        return self.device.type == "cuda" and self.mode is not False

    def offloading(self) -> bool | None:
        """True/False once known; None while auto has not measured yet."""
        if not self.active:
            return False
        if self.mode is True:
            return True
        return None if self.measurement is None else self.measurement.offload

    def forward(self):
        """The context of one pass's forward: where its saved tensors go."""
        decided = self.offloading()
        if decided is False:
            return contextlib.nullcontext()
        if decided is True:
            return HostOffload()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._counter = HostOffload()
        return self._counter

    def after_pass(self, trainable: list[torch.nn.Parameter], optimizer_has_state: bool) -> None:
        """After the backward of a pass: auto decides from the first one."""
        if self._counter is None:
            return
        counter, self._counter = self._counter, None
        stats = torch.cuda.memory_stats(self.device)
        free, _total = torch.cuda.mem_get_info(self.device)
        self.measurement = decide(counter.saved_bytes, stats["reserved_bytes.all.peak"],
                                  stats["allocated_bytes.all.peak"],
                                  0 if optimizer_has_state else adam_state_bytes(trainable),
                                  torch.cuda.memory_reserved(self.device), free, self.max_memory)
        if self.notify is not None:
            self.notify(self.measurement.describe())

    def describe(self) -> dict:
        """What training.json records about it."""
        setting = {True: "on", False: "off"}.get(self.mode, self.mode)
        if not self.active:
            return {"setting": setting, "offloaded": False}
        if self.measurement is None:
            return {"setting": setting, "offloaded": self.mode is True}
        return {"setting": setting, **self.measurement.to_dict()}
