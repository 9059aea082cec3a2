"""Pattern specs: a flat list of head groups ``[(share, rule), ...]`` plus the
chunk size and dilation settings, as defined in docs/patterns.md.

A spec is data. ``groups_for(n)`` resolves it for a window of ``n`` tokens
(``scca_flow`` has as many groups as there are chunks, so groups depend on
``n``), and ``head_rules(n, num_heads)`` gives the rule of every query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from .rules import Rule

DEFAULT_CHUNK_RATIO = Fraction(1, 4)  # LongLoRA's group-size ratio


@dataclass(frozen=True)
class PatternSpec:
    """A named pattern with its parameters.

    name:        preset name or "custom"
    groups:      ((share, rule), ...) with shares summing to 1; empty for
                 ``scca_flow``, whose groups depend on the window length
    flow:        True for scca_flow (groups = one cross(g) per chunk)
    chunk_size:  fixed chunk size G in tokens, or None to use chunk_ratio
    chunk_ratio: G = max(1, floor(n * chunk_ratio)) when chunk_size is None
    dilation:    the r of ``sda`` (None for other patterns)
    """

    name: str
    groups: tuple[tuple[Fraction, Rule], ...] = ()
    flow: bool = False
    chunk_size: int | None = None
    chunk_ratio: Fraction = DEFAULT_CHUNK_RATIO
    dilation: int | None = None
    source: str = field(default="", compare=False)  # the text the user wrote

    # -- resolution for one window length --------------------------------------
    @property
    def is_full(self) -> bool:
        return not self.flow and all(rule.kind == "causal" for _, rule in self.groups)

    def chunk_for(self, n: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return max(1, math.floor(n * self.chunk_ratio))

    def groups_for(self, n: int) -> list[tuple[Fraction, Rule]]:
        if not self.flow:
            return list(self.groups)
        count = math.ceil(n / self.chunk_for(n))
        return [(Fraction(1, count), Rule("cross", distance=g)) for g in range(count)]

    def head_rules(self, n: int, num_heads: int) -> list[Rule]:
        """The rule of each query head: group i starts at floor(S_i * H)."""
        rules: list[Rule] = []
        start_share = Fraction(0)
        groups = self.groups_for(n)
        for index, (share, rule) in enumerate(groups):
            begin = math.floor(start_share * num_heads)
            start_share += share
            end = num_heads if index == len(groups) - 1 else math.floor(start_share * num_heads)
            rules.extend([rule] * (end - begin))
        return rules

    def head_groups(self, n: int, num_heads: int) -> list[tuple[int, int, Rule]]:
        """Contiguous runs of heads that share a rule: ``[(first, end, rule), ...]``.

        Groups that received no head are left out, and neighbouring groups with
        the same rule are merged, so each run can be computed in one batch.
        """
        runs: list[tuple[int, int, Rule]] = []
        for head, rule in enumerate(self.head_rules(n, num_heads)):
            if runs and runs[-1][2] == rule:
                runs[-1] = (runs[-1][0], head + 1, rule)
            else:
                runs.append((head, head + 1, rule))
        return runs

    # -- description -----------------------------------------------------------
    def canonical(self) -> str:
        """Text form of the groups in the pattern syntax (for records and help)."""
        if self.flow:
            return "scca_flow"
        return " + ".join(f"{share} {rule.label()}" for share, rule in self.groups)

    def to_dict(self) -> dict:
        """What a result record stores about the pattern."""
        return {
            "name": self.name,
            "groups": "flow: 1/n cross(g), g = 0..n-1, n = ceil(N/G)" if self.flow else self.canonical(),
            "chunk_size": self.chunk_size,
            "chunk_ratio": str(self.chunk_ratio),
            "dilation": self.dilation,
        }
