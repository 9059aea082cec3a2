"""Checkpoints of a run and the folder a run writes.

``checkpoint.pt`` (one ``torch.save`` file, written atomically: a reader sees the old
checkpoint or the new one, never half of one) holds everything the next step depends on:
the trainable weights, AdamW's state, the schedule, the RNG states, the position in the
window order and the history so far, plus the run's *key* (base weights, pattern, RoPE
scaling, ctx, data, recipe). ``--resume`` continues only a checkpoint whose key matches,
so the resumed run ends exactly where an uninterrupted one would. It is read with
``torch.load(weights_only=True)``.

The run's results go next to it: the peft adapter (``adapter_config.json``,
``adapter_model.safetensors``), ``trainable_params.bin`` and last ``training.json``.

A sharded run (``--shard``) writes the same files: its weights and AdamW's state are
gathered whole on rank 0 first (``sharding.full_trainable_state``), so every rank calls
``save`` and ``trainable_state`` and rank 0 alone writes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..models.adapters import ADAPTER_CONFIG, TRAINABLE_PARAMS, TRAINING_RECORD
from ..files import atomic_write
from ..models.fingerprint import WEIGHT_PATTERNS
from ..records import write_training_record
from .lora import fully_trained_state, trainable_parameters
from .loop import History, Trainer
from .sharding import (full_optimizer_state, full_trainable_state, load_optimizer_state,
                       load_trainable_state)

CHECKPOINT = "checkpoint.pt"
FORMAT = 1
# Recipe options that do not change the numbers of a step: a resumed run may change them.
NOT_IN_KEY = ("steps", "max_time", "save_every", "compile", "cuda_graphs", "gradient_checkpointing",
              "offload_activations", "max_memory_gib")


def run_key(*, model: dict, pattern: dict, rope_scaling, ctx: int, data: str, recipe: dict, dtype: str) -> dict:
    """Everything that decides the weights after step k (what a checkpoint must match)."""
    fingerprint = model.get("fingerprint")
    return {
        "model": {"id": model.get("id"),
                  "weights": fingerprint.get("digest") if isinstance(fingerprint, dict) else None},
        "pattern": pattern,
        "rope_scaling": rope_scaling,
        "ctx": ctx,
        "data": data,
        "dtype": dtype,
        "recipe": {key: value for key, value in recipe.items() if key not in NOT_IN_KEY},
    }


def check_out_folder(out: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start afresh); refuses a folder holding another run."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder for the adapter")
    checkpoint = folder / CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            if (folder / TRAINING_RECORD).is_file():
                raise UserError(f"--resume: the run in {out} finished and its {CHECKPOINT} was removed; a run made "
                                "with --keep-checkpoint can be extended with --resume and more --steps")
            raise UserError(f"--resume: {out} holds no {CHECKPOINT} to continue; leave --resume out to start "
                            "a new run there")
        return checkpoint
    if checkpoint.is_file() or (folder / TRAINING_RECORD).is_file():
        raise UserError(f"{out} already holds a fine-tuning run; pass --resume to continue it (same options), "
                        "or choose another --out")
    if (folder / ADAPTER_CONFIG).is_file():
        raise UserError(f"{out} already holds an adapter ({ADAPTER_CONFIG}); choose another --out")
    if folder.is_dir():
        _refuse_a_folder_of_other_files(folder, out)
    return None


def _refuse_a_folder_of_other_files(folder: Path, out) -> None:
    """A new run does not write into a model's folder: the adapter's files would count as the
    model's weights, so it would no longer be the base the adapter was trained from."""
    model_files = sorted(path.name for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern))
    if model_files:
        raise UserError(f"--out {out} holds a model ({model_files[0]}): the adapter's files there would count as "
                        "that model's weights, and ppl would then refuse it as the adapter's base; give --out a new "
                        "folder of its own for the adapter")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(path: Path, key: dict, trainer: Trainer, write: bool = True) -> None:
    """Write the checkpoint atomically (a full disk leaves the previous one as it was).

    Every rank of a sharded run calls it (the state is gathered from all); only the one
    with ``write`` (rank 0) writes."""
    trainable = full_trainable_state(trainer.model)
    optimizer = full_optimizer_state(trainer.model, trainer.optimizer)
    if not write:
        return
    state = {
        "format": FORMAT,
        "key": json.dumps(key, sort_keys=True),
        "history": trainer.history.to_dict(),
        "trainable": trainable,
        "optimizer": optimizer,
        "scheduler": trainer.scheduler.state_dict(),
        "rng": _rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    names = []
    for name in sorted(set(saved) | set(wanted)):
        a, b = saved.get(name), wanted.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _differences(a, b, f"{prefix}{name}.")
        elif a != b:
            names.append(f"{prefix}{name}")
    return names


def restore(path: Path, key: dict, trainer: Trainer) -> None:
    """Put the checkpoint's state into ``trainer``; refuses one made by another run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved_key = json.loads(state["key"])
        if state.get("format") != FORMAT:
            raise ValueError(f"format {state.get('format')}")
    except Exception as error:  # truncated file, refused pickle, missing entries
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UserError(f"cannot read the checkpoint {path} ({first}): it is damaged; start a new run "
                        "in another --out") from None
    differing = _differences(saved_key, key)
    if differing:
        what = ", ".join(differing[:4])
        if any(name.startswith("model.") for name in differing):
            what = "the base model (another base or other weights)"
        raise UserError(f"the checkpoint in {path.parent} was made by another run (it differs in {what}); "
                        "resume with the options it was started with, or choose another --out")
    own = trainable_parameters(trainer.model)
    if set(state["trainable"]) != set(own):
        raise UserError(f"the checkpoint in {path.parent} does not fit this model's trainable weights; "
                        "resume with the options it was started with")
    load_trainable_state(trainer.model, state["trainable"])
    load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    trainer.history = History.from_dict(state["history"])


def trainable_state(peft_model) -> dict[str, torch.Tensor]:
    """The trained weights, whole, for ``write_results`` (every rank calls it; see ``save``)."""
    return full_trainable_state(peft_model)


def write_results(out: Path, peft_model, trained: dict[str, torch.Tensor], record: dict) -> None:
    """The adapter folder ``ppl --adapter`` and LongLoRA's merge script read; training.json last.

    ``trained``: :func:`trainable_state` (whole tensors, also when the model is sharded)."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    try:
        try:
            # peft picks the LoRA entries out of the state given (the model may hold only shards);
            # the trained embeddings go to trainable_params.bin (LongLoRA's layout), not into the
            # adapter, and saying so keeps peft from asking the hub whether the vocabulary grew.
            peft_model.save_pretrained(str(staging), state_dict=trained, save_embedding_layers=False)
        except OSError as error:
            raise UserError(f"cannot write the adapter to {out}: {error.strerror or error}; free some space "
                            "or choose another --out") from None
        for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
            os.replace(staging / name, out / name)  # atomic per file
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fully_trained = fully_trained_state(trained)
    target = out / TRAINABLE_PARAMS
    if fully_trained:
        buffer = io.BytesIO()
        torch.save(fully_trained, buffer)
        atomic_write(target, lambda handle: handle.write(buffer.getbuffer()))
    else:
        target.unlink(missing_ok=True)
    write_training_record(out, record)
