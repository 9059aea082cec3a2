"""Every record kind, built here: perplexity cells (stride, lm-eval, LongLoRA protocols),
passkey cells and ``training.json``.

They share one ``SCHEMA``, one way to name the device, the package versions, and one
tokenizer fingerprint (``data.tokens.tokenizer_fingerprint``) under ``config.tokenizer_fingerprint``.
Torch is imported inside the functions that need a model, so that reading records does not.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone

from .. import __version__
from .identity import record_pattern_name

# Schema 2: ``config.tokenizer_fingerprint`` of every record, and ``fingerprint`` in a record's
# tokenizer summary (``config.model.tokenizer``, ``base_model.tokenizer`` of training.json), are
# ``data.tokens.tokenizer_fingerprint``: a digest of what decides the ids, the same on every
# ``tokenizers`` release. Schema 1 perplexity records held a digest of the serialized form (which
# changes with the release), passkey records one of the definition and the BOS/EOS habit
# ("sha256:..."); they are read as before and compared by their tokenizer summaries
# (``identity.comparable_tokenizers``).
SCHEMA = 2
TRAINING_RECORD_KIND = "scca-eval finetune"  # the "kind" of a fine-tune run's training.json


# ---------------------------------------------------------------- what every kind stores

def package_versions() -> dict:
    """scca-eval's version and those of the packages that compute the numbers (peft runs the adapters)."""
    from importlib.metadata import version

    import torch
    import transformers

    return {
        "scca_eval": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": version("peft"),
        "python": platform.python_version(),
    }


def device_name(device) -> str:
    """How records (and the remembered rates of ``evaluation/cost.py``) name a device:
    the GPU's name, or the CPU's kind and the number of threads torch uses."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def model_device(model):
    return next(model.parameters()).device


def model_dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def determinism(model) -> tuple[bool, str]:
    """Whether running the same cell again on this device gives the same float64 sums bit for
    bit, and why. CPU kernels sum in a fixed order for a given number of threads (tested);
    on a GPU, matrix-product and attention kernels are chosen per shape and may split their
    sums differently from run to run, so a GPU run is not claimed to be bitwise repeatable."""
    import torch

    device = model_device(model)
    attention = getattr(model.config, "_attn_implementation", None) or "unknown"
    if device.type == "cpu":
        return True, (f"CPU run with {torch.get_num_threads()} threads: kernels sum in a fixed order, so the "
                      f"same run gives the same numbers bit for bit (attention: {attention})")
    flag = torch.are_deterministic_algorithms_enabled()
    return False, (f"{device.type} run: cuBLAS matrix products and the attention kernels ({attention}) may "
                   "choose different algorithms or summation orders from run to run, and the per-window sums "
                   "are accumulated with atomic adds, so repeated runs can differ in the last bits; "
                   f"torch.are_deterministic_algorithms_enabled() was {str(flag).lower()}")


def peak_memory(device) -> dict:
    """Peak memory of this process: the device's allocator on a GPU, resident memory on CPU."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return {"kind": "cuda max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return {"kind": "process peak resident memory", "bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


def runtime(lm, *, seconds: float, tokens_per_second, device_text: str, processes: int, started, compiled: bool,
            **extra) -> dict:
    """The record's ``runtime``: timing, device, processes, determinism, compilation
    (``compiled``: ``evaluation.engine.is_compiled``)."""
    deterministic, note = determinism(lm)
    return {
        "seconds": round(seconds, 3),
        "tokens_per_second": tokens_per_second,
        "device": device_text,
        "processes": processes,
        "started": started.isoformat(timespec="seconds"),
        **extra,
        "deterministic": deterministic,
        "determinism_note": note,
        "compiled": compiled,
    }


# ---------------------------------------------------------------- cell records (ppl, lm-eval, LongLoRA, passkey)

def _cell_record(model_id: str, task: str, spec, ctx: int, stride: int, config: dict, *, skipped=(),
                 metrics=None, documents=None, runtime_=None) -> dict:
    """The keys every cell record has, in the order they are written."""
    record = {
        "schema": SCHEMA,
        "model": model_id,
        "task": task,
        "pattern": record_pattern_name(spec),
        "ctx": ctx,
        "stride": stride,
        "metrics": metrics,
        "documents": documents,
        "skipped_documents": list(skipped),
        "config": config,
    }
    if runtime_ is not None:
        record["runtime"] = runtime_
    return record


def new_record(model_id: str, spec, tokenized, ctx: int, stride: int, config: dict) -> dict:
    """A perplexity record's skeleton: metrics, documents and runtime are filled in once the cell ran."""
    return _cell_record(model_id, tokenized.task.name, spec, ctx, stride, config, skipped=tokenized.skipped)


def cell_config(lm, tokenizer, spec, tokenized, *, add_bos, max_tokens, batch) -> dict:
    """The settings every perplexity record stores, whatever its protocol."""
    from ..models import model_record

    return {
        "model": model_record(lm, tokenizer),
        "pattern": spec.to_dict(),
        "task": tokenized.describe(),
        "data_fingerprint": tokenized.data_fingerprint,
        "tokenizer_fingerprint": tokenized.tokenizer_fingerprint,  # data.tokens.tokenizer_fingerprint
        "add_bos": add_bos,
        "max_tokens": max_tokens,
        "batch_size": batch,
        "dtype": model_dtype(lm),
        "versions": package_versions(),
    }


def longlora_record(lm, tokenizer, model_id: str, spec, tokenized, ctx: int, step: int, *, add_bos, max_tokens,
                    batch: int, window_losses, nll_sum: float, tokens: int, distinct_tokens: int,
                    runtime: dict) -> dict:
    """A cell of LongLoRA's protocol: one stream, ``window_losses`` the mean NLL of each
    window, averaged as LongLoRA's eval.py averages them (``windows.longlora_perplexity``)."""
    import numpy as np

    from ..evaluation.windows import longlora_perplexity

    config = {"protocol": "longlora", "longlora_step": step,
              **cell_config(lm, tokenizer, spec, tokenized, add_bos=add_bos, max_tokens=max_tokens, batch=batch)}
    metrics = {
        "perplexity": longlora_perplexity(window_losses),
        "perplexity_batched_as_published": longlora_perplexity(window_losses, batch_size=batch),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "distinct_tokens_scored": distinct_tokens,
        "windows": len(window_losses),
        "mean_nll": float(np.mean(window_losses)),
        "bits_per_byte": None,
        "byte_perplexity": None,
        "word_perplexity": None,
        "ci95": None,
    }
    documents = [{"id": "stream", "nll_sum": nll_sum, "tokens": tokens, "bytes": None, "words": None}]
    return _cell_record(model_id, tokenized.task.name, spec, ctx, step, config, skipped=tokenized.skipped,
                        metrics=metrics, documents=documents, runtime_=runtime)


def passkey_config(lm, tokenizer, spec, settings: dict) -> dict:
    """The settings a passkey record stores; ``settings`` are the trials' (``config.passkey``).
    The tokenizer fingerprint is the perplexity records' one, with the BOS token counted as
    the prompts have it: the tokenizer's own habit (``PromptBuilder``)."""
    from ..data.tokens import tokenizer_fingerprint
    from ..models import model_record

    info = model_record(lm, tokenizer)
    return {
        "protocol": "passkey",
        "passkey": settings,
        "model": info,
        "pattern": spec.to_dict(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer, add_bos=bool(info["tokenizer"]["adds_bos"])),
        "dtype": model_dtype(lm),
        "versions": package_versions(),
    }


def passkey_record(model_id: str, spec, ctx: int, *, config: dict, metrics: dict, trials: list,
                   runtime: dict) -> dict:
    """A passkey cell: ``metrics`` the accuracies, ``trials`` one entry per prompt (as ``documents``)."""
    return _cell_record(model_id, "passkey", spec, ctx, ctx, config, metrics=metrics, documents=trials,
                        runtime_=runtime)


# ---------------------------------------------------------------- training.json

def training_record(*, model: dict, pattern_name: str, pattern: dict, rope_scaling, ctx: int, data: dict,
                    recipe: dict, history, convergence: dict | None, dtype: str, device,
                    resumed_from: int | None, attention_backend: str, finished: bool,
                    activations: dict | None = None, stopped_by: str = "steps", validation: dict | None = None,
                    eval_every: int | None = None, step: dict | None = None) -> dict:
    """``training.json`` of a fine-tuning run (docs/finetune.md): ``history`` is the run's
    ``training.loop.History``, ``convergence`` what ``training.convergence`` says of it."""
    seconds = history.seconds
    validated = None
    if validation is not None or history.validation:
        # A resumed run without --eval-task keeps the points its checkpoint holds.
        validated = {**(validation or {"fingerprint": history.validation_set}), "every": eval_every,
                     "seconds": round(history.eval_seconds, 3), "curve": history.validation}
    return {
        "schema": SCHEMA,
        "kind": TRAINING_RECORD_KIND,
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
        "convergence": convergence,
        "dtype": dtype,
        "runtime": {
            "seconds": round(seconds, 3),  # the training steps alone (validation: validation.seconds)
            "tokens_per_second": round(history.tokens / seconds, 1) if seconds > 0 else None,
            "peak_memory": peak_memory(device),
            "device": device_name(device),
            "resumed_from_step": resumed_from,
            # where the activations waited for the backward pass (training/offload.py)
            "activations": activations,
            # which step ran and why (training/step_plan.py)
            "step": step,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "versions": package_versions(),
    }
