"""Position interpolation: the `--rope-scaling` option and the trained length.

A LLaMA-family model rotates queries and keys by angles `position * inv_freq`.
Linear position interpolation (Chen et al. 2023, used by LongLoRA) divides every
frequency by a factor `F`, so `F * L` positions fit where the model was trained on
`L`. transformers implements it as the rope type ``"linear"``; this module only
decides the factor and writes it into ``config.rope_parameters`` *before* the model
is built, so transformers computes the positions itself.

Accepted option values (see :func:`parse_rope_scaling`):

``none``
    Keep whatever the checkpoint's config says.
``linear:F``
    Linear interpolation with factor ``F`` (a float above 0).
``longlora:CTX``
    LongLoRA's rule from its ``eval.py``: ``F = ceil(CTX / original)``, where ``CTX`` is the
    context length the model was fine-tuned to and ``original`` is the config's
    ``max_position_embeddings`` (or ``original_ctx`` when given). When ``CTX <= original``
    no scaling is applied, as in LongLoRA.
``longlora``
    The same, with ``CTX`` taken from the ``finetuned_ctx`` argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UserError

_ROPE_HELP = "use none, linear:F (F > 0, e.g. linear:2) or longlora:CTX (e.g. longlora:8192)"


@dataclass(frozen=True)
class RopeScalingRequest:
    """What the user asked for, before it meets a model config."""

    kind: str  # "none", "linear" or "longlora"
    factor: float | None = None  # for "linear"
    finetuned_ctx: int | None = None  # for "longlora"
    text: str = "none"  # the option as written, for the record


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{what} must be a whole number of tokens, got {text!r}") from None
    if value < 1:
        raise UserError(f"{what} must be at least 1, got {value}")
    return value


def parse_rope_scaling(text: str | None, finetuned_ctx: int | None = None) -> RopeScalingRequest:
    """Parse the ``--rope-scaling`` value; raises :class:`UserError` on anything else."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return RopeScalingRequest("none")
    raw = str(text).strip()
    kind, _, argument = raw.partition(":")
    kind = kind.strip().lower()
    argument = argument.strip()
    if kind == "linear":
        if not argument:
            raise UserError(f"--rope-scaling linear needs a factor: {_ROPE_HELP}")
        try:
            factor = float(argument)
        except ValueError:
            raise UserError(f"--rope-scaling {raw!r}: the factor is not a number; {_ROPE_HELP}") from None
        if not math.isfinite(factor) or factor <= 0:
            raise UserError(f"--rope-scaling {raw!r}: the factor must be a finite number above 0")
        return RopeScalingRequest("linear", factor=factor, text=raw)
    if kind == "longlora":
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


def apply_rope_scaling(config, request: RopeScalingRequest, original_ctx: int | None = None) -> dict | None:
    """Write the requested scaling into ``config.rope_parameters`` (in place).

    Returns what was actually applied, for the result record, or None when the
    config was left as it was.
    """
    if request.kind == "none":
        return None
    params = _rope_parameters(config)
    if params is None or "rope_theta" not in params:
        raise UserError(
            f"--rope-scaling needs a model with rotary position embeddings; "
            f"{getattr(config, 'model_type', 'this model')} has none in its config"
        )
    trained = getattr(config, "max_position_embeddings", None)
    if request.kind == "linear":
        factor = request.factor
    else:  # longlora
        original = original_ctx if original_ctx is not None else trained
        if original is None:
            raise UserError(
                "--rope-scaling longlora needs the original context length: the config has no "
                "max_position_embeddings, so give it with --original-ctx"
            )
        original = _positive_int(str(original), "the original context length")
        if request.finetuned_ctx <= original:
            # LongLoRA's eval.py only scales when the fine-tuned length exceeds the original one.
            return {
                "rope_type": params.get("rope_type", "default"),
                "factor": 1.0,
                "requested": request.text,
                "original_ctx": original,
                "note": "fine-tuned length is within the original length: no scaling",
            }
        factor = float(math.ceil(request.finetuned_ctx / original))
    previous = {key: value for key, value in params.items()}
    # A linear scaling replaces any other RoPE variant: keep only what every
    # variant shares (the base and the rotated fraction of each head).
    kept = {key: params[key] for key in ("rope_theta", "partial_rotary_factor") if key in params}
    config.rope_parameters = {**kept, "rope_type": "linear", "factor": float(factor)}
    applied = {"rope_type": "linear", "factor": float(factor), "requested": request.text}
    if request.kind == "longlora":
        applied["original_ctx"] = original
    if previous.get("rope_type", "default") != "default":
        applied["replaced"] = previous
    return applied


def linear_factor(config) -> float:
    """The linear interpolation factor in a config (1.0 when there is none)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("rope_type") == "linear":
        return float(params.get("factor", 1.0))
    return 1.0


def trained_length(model_or_config) -> int | None:
    """The longest context the model was trained for, after position interpolation.

    ``max_position_embeddings`` times the linear factor when linear interpolation is on
    (LongLoRA's merged checkpoints keep the original ``max_position_embeddings`` and add
    the factor). When the RoPE parameters name an ``original_max_position_embeddings``,
    ``max_position_embeddings`` is already the extended length and is returned as is.
    None when the config states no length at all.
    """
    config = getattr(model_or_config, "config", model_or_config)
    trained = getattr(config, "max_position_embeddings", None)
    if trained is None:
        return None
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "original_max_position_embeddings" in params:
        return int(trained)
    return int(round(trained * linear_factor(config)))
