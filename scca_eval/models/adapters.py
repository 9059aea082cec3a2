"""LoRA adapters (peft) and LongLoRA's ``trainable_params.bin``.

A peft adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``.bin``). LongLoRA also trains the embedding and every norm layer in full and
saves them apart, in ``trainable_params.bin`` (a ``torch.save`` of a state dict whose
keys may or may not carry peft's ``base_model.model.`` prefix). Its own scripts load
that file with ``strict=False``, which silently ignores keys that do not match; here
every key must name a parameter of the model with the same shape, or the load stops.

Order (as LongLoRA's ``merge_lora_weights_and_save_hf_model.py``): the base model,
then its embedding resized to the tokenizer, then ``trainable_params.bin`` into the
base weights, then the LoRA weights on top.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MissingDependency, UserError
from .fingerprint import files_fingerprint
from .sources import is_damaged_safetensors, one_line

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINABLE_PARAMS = "trainable_params.bin"
# Written by `scca-eval finetune` next to the adapter (built in scca_eval/records/build.py).
TRAINING_RECORD = "training.json"
PEFT_PREFIX = "base_model.model."
# LongLoRA trains every parameter whose name contains one of these.
FULLY_TRAINED_PARTS = ("embed", "norm")


@dataclass
class AdapterFiles:
    """The files of one adapter, checked to exist."""

    folder: Path
    config: dict
    weights: Path
    trainable_params: Path | None
    # modules the adapter config says were trained in full (embeddings, norms)
    fully_trained: list[str] = field(default_factory=list)
    # training.json of a `scca-eval finetune` run, when the folder has one
    training: dict | None = None

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or "an unnamed base model"


def locate_adapter(adapter: str | Path, trainable_params: str | Path | None = None) -> AdapterFiles:
    """Check the adapter folder (and the optional separate ``trainable_params.bin``)."""
    folder = Path(adapter).expanduser()
    if not folder.exists():
        raise UserError(f"adapter {adapter} does not exist: --adapter takes a peft adapter folder")
    if not folder.is_dir() or not (folder / ADAPTER_CONFIG).is_file():
        raise UserError(
            f"adapter {adapter} is not a peft adapter folder (no {ADAPTER_CONFIG}): "
            "give the folder that adapter.save_pretrained() wrote"
        )
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {folder / ADAPTER_CONFIG}: {error}") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / ADAPTER_CONFIG} is not a JSON object: the adapter folder is damaged")
    if not isinstance(config.get("peft_type"), str):
        raise UserError(f"{folder / ADAPTER_CONFIG} names no peft_type: the adapter folder is damaged; "
                        "save the adapter again (adapter.save_pretrained())")
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise UserError(f"adapter {adapter} has no {' or '.join(ADAPTER_WEIGHTS)}: the adapter folder is incomplete")

    if trainable_params is not None:
        extra = Path(trainable_params).expanduser()
        if not extra.is_file():
            raise UserError(f"trainable params file {trainable_params} does not exist: check the path")
    else:
        extra = folder / TRAINABLE_PARAMS if (folder / TRAINABLE_PARAMS).is_file() else None

    listed = config.get("modules_to_save") or []
    if isinstance(listed, str):
        listed = [listed]
    fully_trained = [name for name in listed if any(part in name for part in FULLY_TRAINED_PARTS)]
    return AdapterFiles(folder, config, weights, extra, fully_trained, _read_training_record(folder))


def _read_training_record(folder: Path) -> dict | None:
    path = folder / TRAINING_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}; the adapter folder is damaged") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not a JSON object: the adapter folder is damaged")
    return record


def training_rope_scaling(files: AdapterFiles) -> tuple[str | None, int | None]:
    """The ``--rope-scaling`` value (and ``--original-ctx``) the adapter was fine-tuned with;
    (None, None) when it was trained without one (or with the base config's own)."""
    rope = (files.training or {}).get("rope_scaling")
    if not isinstance(rope, dict) or rope.get("source") != "option" or rope.get("rope_type") in (None, "default"):
        return None, None
    if rope["rope_type"] == "linear":  # also what longlora:CTX resolved to
        return f"linear:{float(rope['factor']):g}", None
    return rope.get("requested"), rope.get("original_max_position_embeddings")


def check_training_base(files: AdapterFiles, fingerprint: dict | None, model_id: str) -> None:
    """Refuse a base model other than the one the adapter was fine-tuned from (by weights fingerprint)."""
    base = (files.training or {}).get("base_model") or {}
    trained = (base.get("fingerprint") or {}).get("digest") if isinstance(base.get("fingerprint"), dict) else None
    given = fingerprint.get("digest") if isinstance(fingerprint, dict) else None
    if trained and given and trained != given:
        raise UserError(
            f"adapter {files.folder} was fine-tuned from {base.get('id')} ({trained[:19]}), but --model "
            f"{model_id} has other weights ({given[:19]}): pass the base model it was trained from"
        )


def _adapter_weight_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:
            if is_damaged_safetensors(error):
                raise _damaged_weights(path, error) from None
            raise
    return list(_torch_load(path).keys())


def _damaged_weights(path: Path, error: BaseException) -> UserError:
    return UserError(f"the adapter weights {path} are damaged ({one_line(error, 120)}): save or copy the adapter again")


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors, truncated zip, refused object types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read {path} as a tensor file ({first[:160]}): it is damaged or not a state dict") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors: it is not a trainable_params.bin")
    return state


def check_fully_trained_weights(files: AdapterFiles) -> None:
    """Refuse an adapter whose fully trained modules are stored nowhere.

    When ``adapter_config.json`` lists embeddings or norms in ``modules_to_save`` but
    the adapter weights lack them, they must come from ``trainable_params.bin``.
    """
    if not files.fully_trained or files.trainable_params is not None:
        return
    keys = [key for key in _adapter_weight_keys(files.weights) if "lora_" not in key]
    missing = [name for name in files.fully_trained if not any(f".{name}." in f".{key}" for key in keys)]
    if missing:
        raise UserError(
            f"adapter {files.folder} trains {', '.join(missing)} in full (modules_to_save in {ADAPTER_CONFIG}) "
            f"but its weights are not in the adapter and there is no {TRAINABLE_PARAMS}: put LongLoRA's "
            f"{TRAINABLE_PARAMS} in the adapter folder or pass it with --trainable-params"
        )


def read_trainable_params(path: Path) -> dict[str, torch.Tensor]:
    """Load ``trainable_params.bin`` safely, with peft's key prefix removed."""
    state = _torch_load(path)
    return {key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key: value for key, value in state.items()}


def embedding_rows_in(state: dict[str, torch.Tensor], model) -> int | None:
    """Rows of the input embedding stored in ``state`` (None when it holds no embedding)."""
    embedding = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embedding and f"{name}.weight" in state:
            return int(state[f"{name}.weight"].shape[0])
    return None


def load_trainable_params(model, state: dict[str, torch.Tensor], source: Path, model_id: str) -> list[str]:
    """Copy ``state`` into the model's base weights after checking every key and shape."""
    own = model.state_dict()
    unknown = [key for key in state if key not in own]
    if unknown:
        raise UserError(
            f"{source} has {len(unknown)} weights that model {model_id} lacks (first: {unknown[0]}): "
            "it belongs to another base model; pass the base model it was made for"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(
                f"{source} does not fit model {model_id}: {key} has shape {tuple(value.shape)} "
                f"there but {tuple(own[key].shape)} in the model; pass the base model it was made for"
            )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # cannot happen after the check above; kept as a guard
        raise UserError(f"{source}: weights not used by model {model_id}: {result.unexpected_keys[:3]}")
    return sorted(state)


def _require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise MissingDependency("peft", None, "Loading a LoRA adapter")


def attach_adapter(model, files: AdapterFiles, model_id: str, merge: bool):
    """Put the adapter's LoRA weights on ``model``; returns the model to evaluate.

    Unmerged, the returned model is the same transformers model with peft's LoRA
    layers inside it (active), so it has the usual ``.model`` / ``lm_head`` layout;
    merged, the LoRA products are added into the base weights and the LoRA layers
    removed.
    """
    _require_peft()
    from peft import PeftConfig, PeftModel

    def mismatch(detail: str) -> UserError:
        return UserError(
            f"adapter {files.folder} does not fit model {model_id} ({detail}); it was made for "
            f"{files.base_model}: pass that base model with --model"
        )

    try:
        peft_config = PeftConfig.from_pretrained(str(files.folder))
    except Exception as error:
        raise UserError(f"cannot read adapter config in {files.folder}: {str(error).splitlines()[0][:160]}") from None
    peft_config.inference_mode = True
    if files.trainable_params is not None and getattr(peft_config, "modules_to_save", None):
        # Those modules were already loaded into the base weights from trainable_params.bin.
        kept = [name for name in peft_config.modules_to_save if name not in files.fully_trained]
        peft_config.modules_to_save = kept or None

    try:
        with quiet_peft():
            peft_model = PeftModel(model, peft_config, adapter_name="default")
    except ValueError as error:  # "Target modules {...} not found in the base model"
        raise mismatch(str(error).splitlines()[0][:160]) from None
    try:
        result = peft_model.load_adapter(
            str(files.folder), adapter_name="default", is_trainable=False,
            torch_device=str(next(model.parameters()).device),
        )
    except RuntimeError as error:  # size mismatch in load_state_dict
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), None)
        raise mismatch(detail[:200] if detail else "the weight shapes differ") from None
    except Exception as error:
        if is_damaged_safetensors(error):
            raise _damaged_weights(files.weights, error) from None
        raise
    if result.unexpected_keys:
        raise mismatch(f"{len(result.unexpected_keys)} adapter weights have no place in the model, "
                       f"first {result.unexpected_keys[0]}")
    if result.missing_keys:
        raise mismatch(f"{len(result.missing_keys)} adapter weights are missing, first {result.missing_keys[0]}")
    if merge:
        return peft_model.merge_and_unload()
    return peft_model.get_base_model()


@contextlib.contextmanager
def quiet_peft():
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 answers with a
    FutureWarning about its own renaming: nothing a user can act on, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def adapter_record(files: AdapterFiles, merged: bool, trainable_keys: list[str] | None) -> dict:
    """What a result record says about the adapter."""
    training = files.training or {}
    record = {
        "path": str(files.folder.resolve()),
        "fingerprint": files_fingerprint([files.folder / ADAPTER_CONFIG, files.weights]),
        "peft_type": files.config.get("peft_type"),
        "r": files.config.get("r"),
        "lora_alpha": files.config.get("lora_alpha"),
        "target_modules": files.config.get("target_modules"),
        "base_model_name_or_path": files.config.get("base_model_name_or_path"),
        "merged": merged,
        "trainable_params": None,
        # the pattern the adapter was fine-tuned under (from training.json), so tables can label rows
        "training_pattern": training.get("pattern_name"),
        "training": {key: training.get(key) for key in ("pattern", "ctx", "steps", "tokens_seen", "rope_scaling")}
        if training else None,
    }
    if files.trainable_params is not None:
        record["trainable_params"] = {
            "path": str(files.trainable_params.resolve()),
            "fingerprint": files_fingerprint([files.trainable_params]),
            "tensors": len(trainable_keys or []),
        }
    return record
