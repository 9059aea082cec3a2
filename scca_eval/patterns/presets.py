"""The named patterns of docs/patterns.md."""

from __future__ import annotations

from fractions import Fraction as F

from ..choices import DEFAULT_DILATION, PRESET_DESCRIPTIONS
from .rules import Rule
from .spec import PatternSpec

__all__ = ["PRESET_DESCRIPTIONS", "preset"]  # the names and descriptions live in choices.py

LOCAL = Rule("local")
CAUSAL = Rule("causal")

def preset(name: str, *, chunk_size: int | None = None, chunk_ratio: F | None = None,
           dilation: int | None = None) -> PatternSpec:
    """Build a preset spec. ``name`` must be a key of PRESET_DESCRIPTIONS."""
    common = {"chunk_size": chunk_size}
    if chunk_ratio is not None:
        common["chunk_ratio"] = chunk_ratio
    if name == "full":
        return PatternSpec("full", ((F(1), CAUSAL),), **common)
    if name == "s2":
        return PatternSpec("s2", ((F(1, 2), LOCAL), (F(1, 2), Rule("shifted"))), **common)
    if name == "scca_fixed":
        return PatternSpec("scca_fixed", ((F(1, 2), LOCAL), (F(1, 2), Rule("cross", distance=1))), **common)
    if name == "scca_flow":
        return PatternSpec("scca_flow", flow=True, **common)
    if name == "sda":
        r = DEFAULT_DILATION if dilation is None else dilation
        groups = tuple((F(1, r), Rule("dilated", rate=r, offset=j)) for j in range(r))
        return PatternSpec("sda", groups, dilation=r, **common)
    if name == "longmixed":
        groups = (
            (F(1, 4), LOCAL),
            (F(1, 4), Rule("cross", distance=1)),
            (F(1, 8), Rule("dilated", rate=2, offset=0)),
            (F(1, 8), Rule("dilated", rate=2, offset=1)),
        ) + tuple((F(1, 16), Rule("dilated", rate=4, offset=j)) for j in range(4))
        return PatternSpec("longmixed", groups, **common)
    raise KeyError(name)
