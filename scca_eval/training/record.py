"""``training.json``: everything needed to trust and repeat a fine-tuning run.

``ppl --adapter`` reads two of its entries: ``rope_scaling`` (applied unless the user
gives ``--rope-scaling``) and ``pattern`` (reported as the adapter's training pattern in
every record made with it); and checks ``base_model.fingerprint`` against the base model
it is given.
"""

from __future__ import annotations

import resource
import sys
from datetime import datetime, timezone

import torch

from ..records import package_versions
from .convergence import convergence
from .loop import History

SCHEMA = 1


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process: the device's allocator on a GPU, resident memory on CPU."""
    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return {"kind": "process peak resident memory", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def training_record(*, model: dict, pattern_name: str, pattern: dict, rope_scaling, ctx: int, data: dict,
                    recipe: dict, history: History, dtype: str, device: torch.device, resumed_from: int | None,
                    attention_backend: str, finished: bool, activations: dict | None = None,
                    stopped_by: str = "steps", validation: dict | None = None,
                    eval_every: int | None = None) -> dict:
    seconds = history.seconds
    validated = None
    if validation is not None or history.validation:
        # A resumed run without --eval-task keeps the points its checkpoint holds.
        validated = {**(validation or {"fingerprint": history.validation_set}), "every": eval_every,
                     "seconds": round(history.eval_seconds, 3), "curve": history.validation}
    return {
        "schema": SCHEMA,
        "kind": "scca-eval finetune",
        "finished": finished,
        "base_model": {key: model.get(key) for key in ("id", "source", "architecture", "fingerprint",
                                                       "gguf_sha256", "num_parameters", "tokenizer")},
        "pattern_name": pattern_name,
        "pattern": pattern,
        "attention_backend": attention_backend,
        "rope_scaling": rope_scaling,
        "ctx": ctx,
        "data": data,
        "recipe": recipe,
        "lr_schedule": {"kind": "constant with linear warm-up (transformers get_constant_schedule_with_warmup)",
                        "peak_lr": recipe["lr"], "warmup_steps": recipe["warmup_steps"]},
        "steps": history.step,
        # "steps": --steps were taken; "max_time": --max-time seconds of training were reached first.
        "stopped_by": stopped_by,
        "windows_seen": history.position,
        "tokens_seen": history.tokens,
        "loss_curve": history.loss,
        "lr_curve": history.lr,
        "grad_norm_curve": history.grad_norm,
        "validation": validated,
        "convergence": convergence(history.validation, history.step) if history.validation else None,
        "dtype": dtype,
        "runtime": {
            "seconds": round(seconds, 3),  # the training steps alone (validation: validation.seconds)
            "tokens_per_second": round(history.tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory": peak_memory(device),
            "device": device_name(device),
            "resumed_from_step": resumed_from,
            # where the activations waited for the backward pass (training/offload.py)
            "activations": activations,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": package_versions(),
    }
