"""The head rules of docs/patterns.md, as small mask factories.

A rule answers, for query positions ``q`` and key positions ``k`` (0-based
inside the window) and a chunk size ``G``, whether the query may attend the
key. ``allows`` works on broadcastable integer tensors, so the same code builds
the dense reference mask (``q`` a column, ``k`` a row) and serves as a
FlexAttention ``mask_mod`` (``q`` and ``k`` scalar tensors). Every rule already
includes its fallback and the causal condition ``k <= q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RULE_KINDS = ("causal", "local", "shifted", "cross", "dilated")


@dataclass(frozen=True)
class Rule:
    """One head rule.

    kind:     causal | local | shifted | cross | dilated
    shift:    shifted only; chunk borders move by this many tokens
              (None means half a chunk, ``G // 2``).
    distance: cross only; K/V come from ``distance`` chunks earlier.
    rate, offset: dilated only; keys at distances offset, offset+rate, ...
    """

    kind: str
    shift: int | None = None
    distance: int = 0
    rate: int = 1
    offset: int = 0

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}")

    # -- naming -----------------------------------------------------------------
    def label(self) -> str:
        """Canonical text form, the one the pattern syntax reads back."""
        if self.kind == "shifted":
            return "shifted" if self.shift is None else f"shifted({self.shift})"
        if self.kind == "cross":
            return f"cross({self.distance})"
        if self.kind == "dilated":
            return f"dilated({self.rate},{self.offset})"
        return self.kind

    # -- semantics --------------------------------------------------------------
    def shift_for(self, chunk: int) -> int:
        return chunk // 2 if self.shift is None else self.shift

    def allows(self, q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
        """Boolean tensor: may the query at ``q`` attend the key at ``k``."""
        causal = k <= q
        if self.kind == "causal":
            return causal
        if self.kind == "local":
            return causal & (q // chunk == k // chunk)
        if self.kind == "shifted":
            s = self.shift_for(chunk)
            return causal & ((q + s) // chunk == (k + s) // chunk)
        if self.kind == "cross":
            cq, ck = q // chunk, k // chunk
            d = self.distance
            # Where there is no chunk d steps back, the head falls back to local.
            return causal & (((cq >= d) & (ck == cq - d)) | ((cq < d) & (ck == cq)))
        # dilated: distances offset, offset + rate, ...; a query with no such key
        # (q < offset) attends to itself.
        dist = q - k
        return causal & ((dist % self.rate == self.offset) | ((q < self.offset) & (dist == 0)))

    def pairs(self, n: int, chunk: int) -> int:
        """Number of allowed (query, key) pairs in a window of n tokens (for density)."""
        pos = torch.arange(n)
        return int(self.allows(pos[:, None], pos[None, :], chunk).sum())
