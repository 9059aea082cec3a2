"""RoPE scaling: the `--rope-scaling` option, and the context length a model covers.

A LLaMA-family model rotates queries and keys by angles `position * inv_freq`. The
scalings below change those frequencies so that more positions fit than the model was
trained on. transformers implements every one of them (its ``rope_parameters`` rope
types); this module only turns the option into ``config.rope_parameters`` *before* the
model is built, so transformers computes the positions itself.

Accepted option values (see :func:`parse_rope_scaling`); ``L`` is the original length,
``--original-ctx`` or else the config's ``max_position_embeddings``:

``none``
    Keep whatever the checkpoint's config says.
``linear:F``
    Linear position interpolation (Chen et al. 2023, used by LongLoRA): every frequency
    divided by ``F`` (a float above 0).
``longlora:CTX``
    LongLoRA's rule from its ``eval.py``: linear with ``F = ceil(CTX / L)``, where ``CTX`` is
    the context length the model was fine-tuned to. When ``CTX <= L`` no scaling is
    applied, as in LongLoRA. ``longlora`` alone takes ``CTX`` from ``finetuned_ctx``.
``dynamic:F``
    Dynamic NTK: the RoPE base grows with the length of each forward pass beyond the
    config's ``max_position_embeddings`` (``--original-ctx`` does not apply). Here every
    forward pass gets the frequencies of its own length (see :func:`dynamic_rope_per_forward`).
``yarn:F[,KEY=VALUE...]``
    YaRN (Peng et al. 2023) from ``L`` to ``F * L``; options ``beta_fast``, ``beta_slow``,
    ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate`` (transformers' defaults
    otherwise).
``llama3:F[,KEY=VALUE...]``
    Llama 3.1's frequency-dependent scaling from ``L`` to ``F * L``; options
    ``low_freq_factor`` (default 1) and ``high_freq_factor`` (default 4), Llama 3.1's values.

yarn and llama3 also set ``max_position_embeddings`` to ``F * L``, the way checkpoints
that ship these scalings state their length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

SCALINGS = ("none", "linear:F", "longlora:CTX", "dynamic:F", "yarn:F", "llama3:F")
_ROPE_HELP = ("use none, linear:F, longlora:CTX, dynamic:F, yarn:F or llama3:F "
              "(e.g. yarn:4 or yarn:4,beta_fast=32)")

# The extra keys each rope type takes in transformers' rope_parameters, with their types.
_OPTIONS: dict[str, dict[str, type]] = {
    "yarn": {"beta_fast": float, "beta_slow": float, "attention_factor": float, "mscale": float,
             "mscale_all_dim": float, "truncate": bool},
    "llama3": {"low_freq_factor": float, "high_freq_factor": float},
}
# transformers requires both llama3 keys; these are the values Llama 3.1 ships with.
_DEFAULTS: dict[str, dict] = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}
_FACTOR_KINDS = ("linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScalingRequest:
    """What the user asked for, before it meets a model config."""

    kind: str  # "none", "linear", "longlora", "dynamic", "yarn" or "llama3"
    factor: float | None = None  # for every kind but "longlora"
    finetuned_ctx: int | None = None  # for "longlora"
    options: tuple[tuple[str, object], ...] = ()  # extra rope_parameters keys (yarn, llama3)
    text: str = "none"  # the option as written, for the record


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{what} must be a whole number of tokens, got {text!r}") from None
    if value < 1:
        raise UserError(f"{what} must be at least 1, got {value}")
    return value


def _factor(kind: str, argument: str, raw: str) -> float:
    if not argument:
        raise UserError(f"--rope-scaling {kind} needs a factor, e.g. {kind}:2; {_ROPE_HELP}")
    try:
        factor = float(argument)
    except ValueError:
        raise UserError(f"--rope-scaling {raw!r}: the factor is not a number; {_ROPE_HELP}") from None
    if not math.isfinite(factor) or factor <= 0:
        raise UserError(f"--rope-scaling {raw!r}: the factor must be a finite number above 0")
    if kind != "linear" and factor < 1:
        # transformers' dynamic, yarn and llama3 formulas assume a factor of at least 1.
        raise UserError(f"--rope-scaling {raw!r}: the factor of {kind} must be at least 1")
    return factor


def _option(kind: str, item: str, raw: str) -> tuple[str, object]:
    """One ``KEY=VALUE`` after the factor, checked against what transformers takes for ``kind``."""
    allowed = _OPTIONS.get(kind, {})
    key, sign, value = (part.strip() for part in item.partition("="))
    if not allowed:
        raise UserError(f"--rope-scaling {raw!r}: {kind} takes no options (only yarn and llama3 do)")
    if not sign or key not in allowed:
        raise UserError(f"--rope-scaling {raw!r}: {item.strip()!r} is not an option of {kind}; "
                        f"write KEY=VALUE with KEY one of {', '.join(allowed)}")
    if allowed[key] is bool:
        if value.lower() not in ("true", "false"):
            raise UserError(f"--rope-scaling {raw!r}: {key} must be true or false, got {value!r}")
        return key, value.lower() == "true"
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--rope-scaling {raw!r}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"--rope-scaling {raw!r}: {key} must be a finite number, got {value!r}")
    return key, number


def parse_rope_scaling(text: str | None, finetuned_ctx: int | None = None) -> RopeScalingRequest:
    """Parse the ``--rope-scaling`` value; raises :class:`UserError` on anything else.

    Every command that loads a model takes the option through this function.
    """
    if text is None or str(text).strip().lower() in ("", "none"):
        return RopeScalingRequest("none")
    raw = str(text).strip()
    head, *items = raw.split(",")
    kind, _, argument = head.partition(":")
    kind = kind.strip().lower()
    argument = argument.strip()
    if kind in _FACTOR_KINDS:
        factor = _factor(kind, argument, raw)
        options = tuple(_option(kind, item, raw) for item in items if item.strip())
        keys = [key for key, _ in options]
        if len(set(keys)) < len(keys):
            raise UserError(f"--rope-scaling {raw!r}: an option is given twice")
        return RopeScalingRequest(kind, factor=factor, options=options, text=raw)
    if kind == "longlora":
        if items:
            raise UserError(f"--rope-scaling {raw!r}: longlora takes no options")
        if argument:
            ctx = _positive_int(argument, "the fine-tuning context length in --rope-scaling longlora:CTX")
        elif finetuned_ctx is not None:
            ctx = _positive_int(str(finetuned_ctx), "the fine-tuning context length")
        else:
            raise UserError(
                "--rope-scaling longlora needs the context length the model was fine-tuned to: "
                "write longlora:CTX, e.g. longlora:8192"
            )
        return RopeScalingRequest("longlora", finetuned_ctx=ctx, text=f"longlora:{ctx}")
    raise UserError(f"unknown --rope-scaling value {raw!r}: {_ROPE_HELP}")


def _rope_parameters(config) -> dict | None:
    """The config's single rope-parameters dict, or None for a model without RoPE."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        return None
    params = dict(params)
    if any(isinstance(value, dict) for value in params.values()):
        # Per-layer-type RoPE (e.g. sliding/full layers with different bases).
        raise UserError(
            f"--rope-scaling supports models with one set of RoPE parameters; "
            f"{getattr(config, 'model_type', 'this model')} has one per layer type"
        )
    return params


def _original_length(config, original_ctx: int | None, kind: str) -> int:
    original = original_ctx if original_ctx is not None else getattr(config, "max_position_embeddings", None)
    if original is None:
        raise UserError(
            f"--rope-scaling {kind} needs the original context length: the config has no "
            "max_position_embeddings, so give it with --original-ctx"
        )
    return _positive_int(str(original), "the original context length (--original-ctx)")


def _scaled_parameters(config, request: RopeScalingRequest, original_ctx: int | None) -> dict:
    """The rope-type keys of the request (without the base), or {"factor": 1.0} for no scaling."""
    if request.kind == "linear":
        return {"rope_type": "linear", "factor": float(request.factor)}
    if request.kind == "longlora":
        original = _original_length(config, original_ctx, "longlora")
        if request.finetuned_ctx <= original:
            # LongLoRA's eval.py only scales when the fine-tuned length exceeds the original one.
            return {"factor": 1.0, "original_ctx": original}
        return {"rope_type": "linear", "factor": float(math.ceil(request.finetuned_ctx / original)),
                "original_ctx": original}
    if request.kind == "dynamic":
        if original_ctx is not None:
            raise UserError(
                "--original-ctx does not apply to --rope-scaling dynamic: transformers' dynamic NTK starts "
                "from the config's max_position_embeddings; leave --original-ctx out"
            )
        return {"rope_type": "dynamic", "factor": float(request.factor)}
    # yarn, llama3: scale from the original length to factor times it.
    original = _original_length(config, original_ctx, request.kind)
    return {"rope_type": request.kind, "factor": float(request.factor),
            "original_max_position_embeddings": original,
            **_DEFAULTS.get(request.kind, {}), **dict(request.options)}


def check_original_ctx(original_ctx, rope_scaling, adapter=None, model: str | None = None) -> None:
    """--original-ctx is where a RoPE scaling starts from: without one (asked for, or an adapter's,
    which may carry the scaling it was trained with) it would change nothing, without a word."""
    if original_ctx is not None and rope_scaling is None and adapter is None:
        where = f" for {model}" if model else ""
        raise UserError(f"--original-ctx {original_ctx}{where} is the length a RoPE scaling starts from, and none is "
                        "asked for: give --rope-scaling too (in a sweep file, per model), or leave --original-ctx out")


def apply_rope_scaling(config, request: RopeScalingRequest, original_ctx: int | None = None) -> dict | None:
    """Write the requested scaling into ``config.rope_parameters`` (in place).

    Returns what was applied, for the result record: the complete RoPE parameters the
    model is built with, the option as written (``requested``) and, when the checkpoint
    carried a scaling of its own, that one (``replaced``). None when the config was
    left as it was.
    """
    if request.kind == "none":
        check_original_ctx(original_ctx, None)
        return None
    params = _rope_parameters(config)
    if params is None or "rope_theta" not in params:
        raise UserError(
            f"--rope-scaling needs a model with rotary position embeddings; "
            f"{getattr(config, 'model_type', 'this model')} has none in its config"
        )
    scaled = _scaled_parameters(config, request, original_ctx)
    original = scaled.pop("original_ctx", None)
    if "rope_type" not in scaled:  # longlora within the original length
        return {"factor": 1.0, **params, "requested": request.text, "original_ctx": original,
                "note": "fine-tuned length is within the original length: no scaling"}
    previous = dict(params)
    # The new scaling replaces any other RoPE variant: keep only what every variant
    # shares (the base and the rotated fraction of each head).
    kept = {key: params[key] for key in ("rope_theta", "partial_rotary_factor") if key in params}
    config.rope_parameters = {**kept, **scaled}
    if "original_max_position_embeddings" in scaled:
        # Checkpoints that ship yarn or llama3 state the extended length here.
        config.max_position_embeddings = int(math.ceil(scaled["factor"] * scaled["original_max_position_embeddings"]))
    _validate(config, request)
    applied = {**config.rope_parameters, "requested": request.text}
    if original is not None:
        applied["original_ctx"] = original
    if previous.get("rope_type", "default") != "default":
        applied["replaced"] = previous
    return applied


def _validate(config, request: RopeScalingRequest) -> None:
    """transformers' own check of the new parameters (it raises on missing keys)."""
    validate = getattr(config, "validate_rope", None)
    if validate is None:
        return
    try:
        validate()
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(f"--rope-scaling {request.text!r}: transformers refuses it: "
                        f"{str(error).splitlines()[0]}") from None


def dynamic_rope_per_forward(model) -> bool:
    """Give every forward pass of a dynamic-NTK model the frequencies of its own length.

    transformers keeps the frequencies of the longest sequence seen so far and reuses them
    for every shorter one still beyond ``max_position_embeddings``, so a window's numbers
    would depend on which windows ran before it (an earlier ctx, another task). A forward
    pre-hook on the rotary embedding puts it back to its original frequencies before each
    pass; transformers then computes them for that pass's length. True when a hook was added.
    """
    added = False
    for module in model.modules():
        if getattr(module, "rope_type", None) == "dynamic" and hasattr(module, "original_inv_freq"):
            module.register_forward_pre_hook(_reset_dynamic_rope)
            added = True
    return added


def _reset_dynamic_rope(module, _args) -> None:
    if module.max_seq_len_cached != module.original_max_seq_len:
        module.inv_freq = module.original_inv_freq.to(module.inv_freq.device)
        module.max_seq_len_cached = module.original_max_seq_len


def beyond_length_message(model_or_config, ctx: int) -> str:
    """One line for a ctx beyond what the model's RoPE settings cover, naming ``--rope-scaling``."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = trained_length(config)
    params = getattr(config, "rope_parameters", None) or {}
    scaled = isinstance(params, dict) and params.get("rope_type", "default") != "default"
    if scaled:
        hint = f"a larger --rope-scaling factor than this {params['rope_type']} scaling's extends it"
    else:
        factor = math.ceil(ctx / limit)
        hint = f"--rope-scaling yarn:{factor} (or dynamic:{factor}, linear:{factor}) extends it to {factor * limit}"
    return f"ctx {ctx} is beyond the {limit} tokens the model's RoPE settings cover; {hint}"


def trained_length(model_or_config) -> int | None:
    """The longest context the model's RoPE settings cover.

    ``max_position_embeddings`` times the factor for linear and dynamic scaling
    (LongLoRA's merged checkpoints keep the original ``max_position_embeddings`` and add
    the factor). When the RoPE parameters name an ``original_max_position_embeddings``
    (yarn, llama3, longrope), the larger of ``max_position_embeddings`` and
    ``factor * original``: checkpoints state the extended length either way. None when
    the config states no length at all.
    """
    config = getattr(model_or_config, "config", model_or_config)
    trained = getattr(config, "max_position_embeddings", None)
    if trained is None:
        return None
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict):
        return int(trained)
    factor = params.get("factor")
    if "original_max_position_embeddings" in params:
        scaled = params["original_max_position_embeddings"] * factor if factor else 0
        return int(max(trained, math.ceil(scaled)))
    if params.get("rope_type") in ("linear", "dynamic") and factor:
        return int(round(trained * float(factor)))
    return int(trained)
