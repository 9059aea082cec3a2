"""Run a pattern inside a transformers model, through its AttentionInterface.

``apply_pattern(model, spec)`` registers an attention implementation named
``"scca"`` with transformers and switches the model to it with the public
``set_attn_implementation``. Each attention layer then calls
:func:`scca_attention`, which looks up the model's pattern and runs it. The
pattern is kept in a small registry keyed by the model's config object, so
several models with different patterns can live in one process.

A matching entry in transformers' AttentionMaskInterface makes the model skip
building a dense ``[B, 1, N, N]`` causal mask: every pattern is causal by
itself, and evaluation windows are never padded (a padded batch is refused).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..patterns.spec import PatternSpec
from .dispatch import BACKENDS, pattern_attention

IMPLEMENTATION = "scca"


@dataclass(frozen=True)
class _Applied:
    config: weakref.ref
    spec: PatternSpec
    backend: str


# id(config) -> the pattern of the model that owns that config
_applied: dict[int, _Applied] = {}


def _remember(config, spec: PatternSpec, backend: str) -> None:
    key = id(config)
    _applied[key] = _Applied(weakref.ref(config, lambda _ref: _applied.pop(key, None)), spec, backend)


def _lookup(config) -> _Applied | None:
    entry = _applied.get(id(config))
    if entry is None or entry.config() is not config:
        return None
    return entry


def pattern_of(model) -> PatternSpec | None:
    """The pattern applied to ``model`` with apply_pattern, or None (plain attention)."""
    entry = _lookup(_base_model(model).config)
    return entry.spec if entry else None


# -- the functions transformers calls ---------------------------------------------
def scca_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: query [B, H, N, D], key/value [B, H_kv, N, D] -> ([B, N, H, D], None)."""
    config = getattr(module, "config", None)
    entry = _lookup(config) if config is not None else None
    if entry is None:
        raise UserError(f"{type(module).__name__} uses the '{IMPLEMENTATION}' attention but no pattern was "
                        "applied to its model; call apply_pattern(model, spec) on it")
    if query.shape[2] != key.shape[2]:
        raise UserError(f"pattern attention scores whole windows ({query.shape[2]} queries against "
                        f"{key.shape[2]} keys here): run the model with use_cache=False and without past keys")
    if attention_mask is not None:
        raise UserError("pattern attention takes no explicit attention mask; pass unpadded windows "
                        "without attention_mask")
    if dropout:  # transformers passes the config's attention_dropout in training mode only
        raise UserError(f"pattern attention has no attention dropout, but {type(module).__name__} is in training "
                        f"mode with attention_dropout={dropout}; load the model with attention_dropout=0 to "
                        "train under a pattern (model.eval() for evaluation)")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    out = pattern_attention(query, key, value, entry.spec, scaling, backend=entry.backend)
    # transformers wants [B, N, H, D] back. The strided backend's result already
    # lies that way in memory, so .contiguous() returns it as it is (no copy);
    # the other backends' [B, H, N, D] results are copied once here.
    return out.transpose(1, 2).contiguous(), None


def scca_mask(attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """AttentionMaskInterface entry: no dense mask, only a check that nothing is padded."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise UserError("pattern attention cannot evaluate padded batches; give windows of equal length "
                        "without padding")
    return None


def register() -> None:
    """Make ``"scca"`` a valid attention implementation in transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, scca_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, scca_mask)


# -- applying a pattern to a model -------------------------------------------------
def _base_model(model):
    """The transformers model inside a peft wrapper (peft's public get_base_model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_architecture(model) -> None:
    """Refuse, with one line, a model whose attention a pattern cannot replace."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"{name} is not a transformers model; attention patterns apply to decoder-only "
                        "causal language models such as LLaMA")
    config = model.config
    model_type = getattr(config, "model_type", "") or "unknown type"
    causal_classes = {value for values in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                      for value in ((values,) if isinstance(values, str) else values)}
    is_causal_lm = any(cls.__name__ in causal_classes for cls in type(model).__mro__)
    if getattr(config, "is_encoder_decoder", False) or not is_causal_lm:
        raise UserError(f"{name} ({model_type}) is not a decoder-only causal language model; attention "
                        "patterns need one, such as LlamaForCausalLM (or use --pattern full)")
    # transformers' own kernels read `module.is_causal`; a False one means bidirectional attention
    if not getattr(config, "is_causal", True) or any(
            getattr(module, "is_causal", True) is False for module in model.modules()):
        raise UserError(f"{name} is configured for bidirectional attention; patterns need causal attention")
    if not type(model).is_backend_compatible():
        raise UserError(f"{name} does not route its attention through transformers' AttentionInterface, "
                        "so a pattern cannot replace it; use --pattern full or a LLaMA-architecture model")
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({kind for kind in layer_types if kind != "full_attention"})
    if other:
        raise UserError(f"{name} has {', '.join(other)} layers; patterns replace full attention only, "
                        "so use --pattern full for this model")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UserError(f"{name} uses sliding-window attention ({config.sliding_window} tokens); patterns "
                        "replace full attention only, so use --pattern full for this model")


def apply_pattern(model, spec: PatternSpec, backend: str = "auto"):
    """Make ``model`` attend under ``spec``; returns the model.

    The full pattern keeps transformers' own SDPA attention. Any other pattern
    switches the model to the ``"scca"`` implementation, after checking that its
    architecture can take it (decoder-only, causal, attention through the
    AttentionInterface, full-attention layers only).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    model = _base_model(model)
    configs = _model_configs(model)
    if spec.is_full:
        if model.config._attn_implementation == IMPLEMENTATION:
            model.set_attn_implementation("sdpa")
        for config in configs:
            _applied.pop(id(config), None)
        return model
    check_architecture(model)
    register()
    for config in configs:
        _remember(config, spec, backend)
    model.set_attn_implementation(IMPLEMENTATION)
    if any(config._attn_implementation != IMPLEMENTATION for config in configs):
        for config in configs:
            _applied.pop(id(config), None)
        raise UserError(f"{type(model).__name__} did not accept a custom attention implementation; "
                        "use --pattern full for this model")
    return model


def _model_configs(model) -> list:
    """The distinct configs of the model and its sub-models (attention layers read theirs)."""
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            seen.setdefault(id(module.config), module.config)
    return list(seen.values())
