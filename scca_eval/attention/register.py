"""Run a pattern inside a transformers model, through its AttentionInterface.

``apply_pattern(model, spec)`` writes the pattern into the model's config and
switches the model to an attention implementation named ``"scca"`` with the
public ``set_attn_implementation``. The config is where transformers already
looks: every attention layer holds it (``module.config``), ``save_pretrained``
writes it to config.json, and a peft wrapper keeps the model's own. So the
pattern travels with the model — across copies, peft wrappers and a save and
reload (load with ``attn_implementation="scca"`` after :func:`register`) — and
``pattern_of(model)`` reads it back from there.

The config holds the pattern's settings as JSON-ready data (``scca_pattern``,
``spec.to_dict()``) and the kernel choice (``scca_attention_backend``). Each
attention layer keeps the :class:`PatternSpec` read from them, so that the
attention call does not read the settings again on every forward.

A matching entry in transformers' AttentionMaskInterface makes the model skip
building a dense ``[B, 1, N, N]`` causal mask: every pattern is causal by
itself, and evaluation windows are never padded (a padded batch is refused).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..patterns.parse import pattern_from_dict
from ..patterns.spec import PatternSpec
from .dispatch import BACKENDS, pattern_attention

IMPLEMENTATION = "scca"
PATTERN_KEY = "scca_pattern"  # config attribute: the pattern's settings (spec.to_dict())
BACKEND_KEY = "scca_attention_backend"  # config attribute: the kernel (dispatch.BACKENDS)
_READ = "_scca_pattern_read"  # attention-layer attribute: (settings, spec, backend) read from the config
# One settings object and one spec object per distinct pattern. Compiled layers are guarded on
# the identity of the settings and the spec they read: the layers of a model share one graph
# only if they read the same objects (else each layer compiles its own, and past dynamo's
# recompile limit the rest run eagerly), and applying a pattern again (after validating a
# run under full attention, say) must hand them the objects they were traced with.
_SETTINGS: dict[PatternSpec, dict] = {}
_SPECS: dict[PatternSpec, PatternSpec] = {}


def _read_pattern(module) -> tuple[PatternSpec, str] | None:
    """The (spec, backend) that ``module.config`` carries, read once per layer and kept on it."""
    config = getattr(module, "config", None)
    data = getattr(config, PATTERN_KEY, None)
    if data is None:
        return None
    backend = getattr(config, BACKEND_KEY, "auto")
    read = getattr(module, _READ, None)
    if read is None or read[0] is not data or read[2] != backend:  # first call, or the config changed
        spec = pattern_from_dict(data)
        read = (data, _SPECS.setdefault(spec, spec), backend)
        setattr(module, _READ, read)
    return read[1], read[2]


def pattern_of(model) -> PatternSpec | None:
    """The pattern ``model`` attends under (None: plain attention), read from its config."""
    model = _base_model(model)
    if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATION:
        return None
    data = getattr(model.config, PATTERN_KEY, None)
    return pattern_from_dict(data) if data is not None else None


def backend_of(model) -> str | None:
    """The attention backend the model's pattern runs on (None: plain attention)."""
    model = _base_model(model)
    return getattr(model.config, BACKEND_KEY, "auto") if pattern_of(model) is not None else None


# -- the functions transformers calls ---------------------------------------------
def scca_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry: query [B, H, N, D], key/value [B, H_kv, N, D] -> ([B, N, H, D], None)."""
    carried = _read_pattern(module)
    if carried is None:
        raise UserError(f"{type(module).__name__} uses the '{IMPLEMENTATION}' attention but no pattern was "
                        "applied to its model; call apply_pattern(model, spec) on it")
    spec, backend = carried
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
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        # autocast casts SDPA's inputs to its dtype, but not those of the kernels here: a float32
        # q_norm (Qwen3) would hand over float32 queries beside bfloat16 values, which the packed
        # kernel cannot take and FlexAttention's backward refuses
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    out = pattern_attention(query, key, value, spec, scaling, backend=backend)
    # transformers wants [B, N, H, D] back. The strided and packed backends' results
    # already lie that way in memory, so .contiguous() returns them as they are (no
    # copy); the other backends' [B, H, N, D] results are copied once here.
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
    """Make ``model`` attend under ``spec``; returns the model (a peft wrapper's base model).

    The full pattern keeps transformers' own SDPA attention. Any other pattern is
    written into the model's config and switches the model to the ``"scca"``
    implementation, after checking that its architecture can take it (decoder-only,
    causal, attention through the AttentionInterface, full-attention layers only).
    A model that already carries ``spec`` on ``backend`` is left as it is, so
    applying a pattern twice costs nothing. Training mode and gradients work as
    in evaluation.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    model = _base_model(model)
    configs = _model_configs(model)
    if spec.is_full:
        if model.config._attn_implementation == IMPLEMENTATION:
            model.set_attn_implementation("sdpa")
        _forget(configs)
        return model
    if pattern_of(model) == spec and backend_of(model) == backend:
        return model
    check_architecture(model)
    register()
    settings = _SETTINGS.setdefault(spec, spec.to_dict())
    for config in configs:
        setattr(config, PATTERN_KEY, settings)
        setattr(config, BACKEND_KEY, backend)
    model.set_attn_implementation(IMPLEMENTATION)
    if any(config._attn_implementation != IMPLEMENTATION for config in configs):
        _forget(configs)
        raise UserError(f"{type(model).__name__} did not accept a custom attention implementation; "
                        "use --pattern full for this model")
    for module in model.modules():  # read the pattern now, outside any compiled graph
        if getattr(module, "config", None) is not None and hasattr(module, "scaling"):
            _read_pattern(module)
    return model


def _forget(configs) -> None:
    for config in configs:
        for key in (PATTERN_KEY, BACKEND_KEY):
            if key in config.__dict__:
                delattr(config, key)


def _model_configs(model) -> list:
    """The distinct configs of the model and its sub-models (attention layers read theirs)."""
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            seen.setdefault(id(module.config), module.config)
    return list(seen.values())
