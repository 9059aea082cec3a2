"""The named patterns of docs/patterns.md."""

from __future__ import annotations

from fractions import Fraction as F

from .rules import Rule
from .spec import PatternSpec

LOCAL = Rule("local")
CAUSAL = Rule("causal")

# name -> one line on what it is (shown by `scca-eval patterns list`)
PRESET_DESCRIPTIONS = {
    "full": "ordinary causal attention (every head sees every earlier token)",
    "s2": "LongLoRA S2-Attn: half the heads in chunks, half in chunks shifted by G/2",
    "scca_fixed": "SCCA fixed: half the heads see their chunk, half the previous chunk",
    "scca_flow": "SCCA flow: head group g sees the chunk g steps back; together every earlier chunk",
    "sda": "Shifted Dilated Attention: r head groups, group j sees distances j, j+r, ... (r = --dilation)",
    "longmixed": "LongMixed: 1/4 local, 1/4 cross(1), 1/8 each dilated(2,j), 1/16 each dilated(4,j)",
}


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
        r = 2 if dilation is None else dilation
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
