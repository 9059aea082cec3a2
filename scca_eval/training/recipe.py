"""The fine-tuning recipe: every option of a run, its default and where the default comes from.

The defaults follow LongLoRA's ``fine-tune.py`` and the command its README gives for
LLaMA-2-7B (``--learning_rate 2e-5 --weight_decay 0.0 --warmup_steps 20
--lr_scheduler_type constant_with_warmup --per_device_train_batch_size 1
--gradient_accumulation_steps 8 --max_steps 1000 --gradient_checkpointing True``); what
that command leaves to transformers' ``TrainingArguments`` (AdamW's betas and epsilon,
gradient clipping, the seed) takes the ``TrainingArguments`` default, as LongLoRA's run
did. ``SOURCES`` says so per option; ``--help`` and docs/finetune.md quote it. Two defaults
are this project's: gradient checkpointing and CUDA graphs are "auto", which checkpoints as
LongLoRA does unless every activation fits on the GPU (training/step_plan.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import UserError

LONGLORA = "LongLoRA's fine-tune.py"
LONGLORA_README = "LongLoRA's README command"
HF_TRAINER = "transformers TrainingArguments default, which LongLoRA's run used"

# Where each default comes from (quoted in --help and docs/finetune.md).
SOURCES = {
    "lora_rank": LONGLORA,
    "lora_alpha": LONGLORA,
    "lora_dropout": LONGLORA,
    "lora_targets": LONGLORA,
    "trainable": LONGLORA,
    "lr": LONGLORA_README,
    "warmup_steps": LONGLORA_README,
    "weight_decay": LONGLORA_README,
    "steps": LONGLORA_README,
    "batch_size": LONGLORA_README,
    "grad_accum": LONGLORA_README,
    "adam_betas": HF_TRAINER,
    "adam_eps": HF_TRAINER,
    "max_grad_norm": HF_TRAINER,
    "seed": HF_TRAINER,
}

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TRAINABLE = ("embed", "norm")
# Bundled training samples, disjoint from the evaluation samples.
DEFAULT_TASKS = ("pg19_train", "proof_pile_train")
# Validation windows per point, in tokens: 8 windows at ctx 16384 (forward passes only: the cost of
# a few training steps), 32 at ctx 4096.
DEFAULT_EVAL_TOKENS = 131_072


@dataclass(frozen=True)
class Recipe:
    """How to train (the optimizer, LoRA, the steps); ``check()`` refuses bad values with one
    line each. ``to_dict()`` is training.json's ``recipe`` and part of the checkpoint's key.
    ``lora_targets`` and ``trainable`` may be given as ``"a,b"`` text (``"none"``: no name)."""

    ctx: int
    steps: int = 1000
    batch_size: int = 1  # windows per forward/backward pass
    grad_accum: int | None = None  # passes per optimizer step (default 8, or from tokens_per_step)
    tokens_per_step: int | None = None
    lr: float = 2e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    # True, False, or "auto": checkpointed unless auto takes the fast step (training/step_plan.py)
    gradient_checkpointing: bool | str = "auto"
    compile: bool = False
    # replay the compiled layers as CUDA graphs (less host work a step; training/lora.py): True,
    # False, or "auto" (on one CUDA GPU where every activation fits; training/step_plan.py)
    cuda_graphs: bool | str = "auto"
    # on a GPU, whether what autograd keeps for the backward pass waits in host memory:
    # True, False, or "auto" (only where keeping it would not fit; training/offload.py)
    offload_activations: bool | str = "auto"
    max_memory_gib: float | None = None  # GPU memory auto may plan with (default: what the device has)
    save_every: int = 50
    max_time: float | None = None  # seconds of training (the steps alone) after which the run stops
    loss_chunk: int = 1024  # positions per chunk of the LM head's loss (never full fp32 logits)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # Frozen all through: module names as tuples, betas as a tuple.
        object.__setattr__(self, "lora_targets", split_names(self.lora_targets))
        object.__setattr__(self, "trainable", split_names(self.trainable))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    def check(self) -> None:
        def whole(value, option, least=1):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{option} must be a whole number of at least {least} (got {value!r})")

        whole(self.ctx, "--ctx", 2)
        whole(self.steps, "--steps")
        whole(self.batch_size, "--batch-size")
        whole(self.save_every, "--save-every")
        whole(self.lora_rank, "--lora-rank")
        whole(self.warmup_steps, "--warmup-steps", 0)
        whole(self.seed, "--seed", 0)
        if self.grad_accum is not None and self.tokens_per_step is not None:
            raise UserError("give either --tokens-per-step or --grad-accum, not both")
        if self.grad_accum is not None:
            whole(self.grad_accum, "--grad-accum")
        if self.tokens_per_step is not None:
            whole(self.tokens_per_step, "--tokens-per-step")
            per_pass = self.batch_size * self.ctx
            if self.tokens_per_step % per_pass:
                raise UserError(f"--tokens-per-step {self.tokens_per_step} is not a multiple of --batch-size x "
                                f"--ctx = {per_pass} tokens; give a multiple, e.g. {per_pass * 8}")
        for option, value in (("--lr", self.lr), ("--lora-alpha", self.lora_alpha)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{option} must be a number above 0 (got {value!r})")
        for option, value in (("--weight-decay", self.weight_decay), ("--max-grad-norm", self.max_grad_norm)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise UserError(f"{option} must be a number of at least 0 (got {value!r})")
        if self.max_time is not None and not (isinstance(self.max_time, (int, float)) and not isinstance(
                self.max_time, bool) and math.isfinite(self.max_time) and self.max_time > 0):
            raise UserError(f"--max-time must be a number of seconds above 0 (got {self.max_time!r})")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be at least 0 and below 1 (got {self.lora_dropout!r})")
        if self.offload_activations not in (True, False, "auto"):
            raise UserError(f"--offload-activations must be auto, on or off (got {self.offload_activations!r})")
        if self.max_memory_gib is not None and not (isinstance(self.max_memory_gib, (int, float))
                                                    and math.isfinite(self.max_memory_gib) and self.max_memory_gib > 0):
            raise UserError(f"--max-memory must be a number of GiB above 0 (got {self.max_memory_gib!r})")
        for option, value in (("--gradient-checkpointing", self.gradient_checkpointing),
                              ("--cuda-graphs", self.cuda_graphs)):
            if not (value is True or value is False or value == "auto"):
                raise UserError(f"{option} must be True, False or \"auto\" (got {value!r})")
        if self.cuda_graphs is True:
            self._check_cuda_graphs()
        check_module_names(self.lora_targets, "--lora-targets")
        check_module_names(self.trainable, "--trainable")
        if not self.lora_targets:
            raise UserError("--lora-targets names no module; give e.g. q_proj,k_proj,v_proj,o_proj")

    def _check_cuda_graphs(self) -> None:
        if not self.compile:
            raise UserError("--cuda-graphs replays the compiled decoder layers: give --compile too")
        if self.gradient_checkpointing is True:
            # torch cannot replay a compiled layer as a CUDA graph when non-reentrant checkpointing
            # runs its forward again inside the backward pass (pytorch/pytorch#154306)
            raise UserError("--cuda-graphs needs --no-gradient-checkpointing: a checkpointed layer runs again "
                            "inside the backward pass, which its CUDA graph cannot replay")
        if self.offload_activations is True:
            raise UserError("--cuda-graphs keeps what the backward pass needs on the GPU: leave "
                            "--offload-activations at auto or off")

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimizer step."""
        if self.tokens_per_step is not None:
            return self.tokens_per_step // (self.batch_size * self.ctx)
        return self.grad_accum if self.grad_accum is not None else 8

    @property
    def windows_per_step(self) -> int:
        return self.batch_size * self.accumulation

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("extra")
        data["adam_betas"] = list(self.adam_betas)
        data["lora_targets"] = list(self.lora_targets)
        data["trainable"] = list(self.trainable)
        data["grad_accum"] = self.accumulation
        data["windows_per_step"] = self.windows_per_step
        data["tokens_per_step"] = self.windows_per_step * self.ctx
        return data


def split_names(text) -> tuple[str, ...]:
    """``"a,b"`` (or a list) → ``("a", "b")``; ``""``/``"none"`` → ``()``."""
    if text is None:
        return ()
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    names = tuple(str(p).strip() for p in parts if str(p).strip())
    return () if names == ("none",) else names


def check_module_names(names: tuple[str, ...], option: str) -> None:
    for name in names:
        if not name.replace("_", "").replace(".", "").replace("-", "").isalnum():
            raise UserError(f"{option}: {name!r} is not a module name; give comma-separated names such as q_proj,v_proj")
