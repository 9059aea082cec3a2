"""The dense reference mask of a pattern, its density, and pictures of it.

``build_mask`` is the ground truth every fast attention path is tested
against: it is built straight from :meth:`Rule.allows` and
:meth:`PatternSpec.head_rules`, with nothing clever in between.
"""

from __future__ import annotations

import functools
import os
from fractions import Fraction

import torch

from ..errors import MissingDependency, UserError
from ..files import atomic_path
from .rules import Rule
from .spec import PatternSpec

# Rows per step when a mask is built or summarized piece by piece, so that a
# long window never needs a [N, N] integer temporary (8 bytes per pair).
_ROW_BLOCK = 1024


def rule_mask(rule: Rule, n: int, chunk: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """BoolTensor [n, n]: may query q (row) attend key k (column) under ``rule``."""
    keys = torch.arange(n, device=device)
    mask = torch.empty(n, n, dtype=torch.bool, device=device)
    for start in range(0, n, _ROW_BLOCK):
        queries = keys[start:start + _ROW_BLOCK]
        mask[start:start + len(queries)] = rule.allows(queries[:, None], keys[None, :], chunk)
    return mask


def build_mask(spec: PatternSpec, n: int, num_heads: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """BoolTensor [H, N, N], True where query head h at q attends the key at k."""
    chunk = spec.chunk_for(n)
    mask = torch.empty(num_heads, n, n, dtype=torch.bool, device=device)
    for first, end, rule in spec.head_groups(n, num_heads):
        mask[first:end] = rule_mask(rule, n, chunk, device)
    return mask


def key_sets(rule: Rule, n: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """For every query q, the keys it attends as an arithmetic progression.

    Returns LongTensors (lo, hi, step, residue), each [n]: query q attends the
    keys k with lo <= k <= hi and k % step == residue. These are closed forms of
    the rule table, so densities and pictures of long windows are cheap; the
    tests check them against the dense mask.
    """
    q = torch.arange(n)
    lo, hi = (q // chunk) * chunk, q.clone()  # own chunk, up to the query
    step, residue = torch.ones_like(q), torch.zeros_like(q)
    if rule.kind == "causal":
        lo = torch.zeros_like(q)
    elif rule.kind == "shifted":
        s = rule.shift_for(chunk)
        lo = (((q + s) // chunk) * chunk - s).clamp(min=0)
    elif rule.kind == "cross" and rule.distance > 0:
        source = q // chunk - rule.distance  # the chunk the keys come from
        far = source >= 0
        lo = torch.where(far, source * chunk, lo)
        hi = torch.where(far, source * chunk + chunk - 1, hi)
    elif rule.kind == "dilated":
        r, j = rule.rate, rule.offset
        seen = q >= j  # otherwise no key qualifies and the query attends itself
        lo = torch.where(seen, torch.zeros_like(q), q)
        hi = torch.where(seen, q - j, q)
        step = torch.where(seen, torch.full_like(q, r), step)
        residue = torch.where(seen, (q - j) % r, residue)
    return lo, hi, step, residue


def _count_in(lo, hi, step, residue, first, last) -> torch.Tensor:
    """How many k in [max(lo, first), min(hi, last)] have k % step == residue."""
    a, b = torch.maximum(lo, first), torch.minimum(hi, last)
    floor = lambda x: torch.div(x - residue, step, rounding_mode="floor")  # noqa: E731
    return torch.where(b >= a, floor(b) - floor(a - 1), torch.zeros_like(a))


def row_counts(rule: Rule, n: int, chunk: int) -> torch.Tensor:
    """Number of keys each query attends under ``rule`` (LongTensor [n]), in O(n)."""
    lo, hi, step, residue = key_sets(rule, n, chunk)
    return _count_in(lo, hi, step, residue, lo, hi)


def density(spec: PatternSpec, n: int, num_heads: int) -> float:
    """Share of the causal (query, key) pairs the pattern keeps, over all heads."""
    chunk = spec.chunk_for(n)
    kept = 0
    for first, end, rule in spec.head_groups(n, num_heads):
        kept += (end - first) * int(row_counts(rule, n, chunk).sum())
    return float(Fraction(kept, num_heads * n * (n + 1) // 2))


# -- pictures -------------------------------------------------------------------
def _cell_counts(rule: Rule, n: int, chunk: int, cells: int) -> torch.Tensor:
    """Allowed (query, key) pairs per cell of a cells x cells grid over the mask."""
    edges = torch.linspace(0, n, cells + 1).round().long()
    first, last = edges[:-1][None, :], edges[1:][None, :] - 1  # key range of each column
    row_cell = torch.bucketize(torch.arange(n), edges[1:], right=True)
    per_query = _count_in(*(x[:, None] for x in key_sets(rule, n, chunk)), first, last)  # [n, cells]
    return torch.zeros(cells, cells, dtype=torch.long).index_add_(0, row_cell, per_query)


@functools.lru_cache(maxsize=8)
def _causal_cell_counts(n: int, cells: int) -> torch.Tensor:
    return _cell_counts(Rule("causal"), n, 1, cells)


def _coverage(rule: Rule, n: int, chunk: int, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell: allowed pairs and causal pairs ([cells, cells] each)."""
    return _cell_counts(rule, n, chunk, cells), _causal_cell_counts(n, cells)


_SHADES = " ░▒▓█"


def render_rule(rule: Rule, n: int, chunk: int, cells: int = 48) -> list[str]:
    """A text picture of one head rule: rows are queries, columns keys.

    Each character is a cell of about n/cells positions: '█' the cell keeps all
    its causal pairs, '▓▒░' fewer, '·' none of them; blank is above the diagonal
    (keys after the query, never attended).
    """
    cells = max(1, min(cells, n))
    allowed, causal = _coverage(rule, n, chunk, cells)
    lines = []
    for row in range(cells):
        chars = []
        for col in range(cells):
            if causal[row, col] == 0:
                chars.append(" ")
            elif allowed[row, col] == 0:
                chars.append("·")
            else:
                share = allowed[row, col].item() / causal[row, col].item()
                chars.append(_SHADES[max(1, round(share * (len(_SHADES) - 1)))])
        lines.append("".join(chars).rstrip())
    return lines


def group_title(first: int, end: int, rule: Rule, chunk: int) -> str:
    heads = f"head {first}" if end - first == 1 else f"heads {first}-{end - 1}"
    extra = ""
    if rule.kind in ("local", "shifted", "cross"):
        extra = f", G={chunk}" + (f", s={rule.shift_for(chunk)}" if rule.kind == "shifted" else "")
    return f"{heads}: {rule.label()}{extra}"


def save_png(spec: PatternSpec, n: int, num_heads: int, path: str | os.PathLike, cells: int = 256) -> None:
    """Draw each head group's mask (one panel per group) into a PNG file."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency("matplotlib", None, "drawing a pattern as PNG") from None
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: the folder {folder} does not exist")
    chunk = spec.chunk_for(n)
    groups = spec.head_groups(n, num_heads)
    cells = max(1, min(cells, n))
    columns = min(4, len(groups))
    rows = -(-len(groups) // columns)
    figure = Figure(figsize=(3.2 * columns, 3.4 * rows))
    for index, (first, end, rule) in enumerate(groups):
        axes = figure.add_subplot(rows, columns, index + 1)
        allowed, causal = _coverage(rule, n, chunk, cells)
        share = allowed.double() / causal.clamp(min=1).double()
        axes.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1, extent=(0, n, n, 0), interpolation="nearest")
        axes.set_title(group_title(first, end, rule, chunk), fontsize=8)
        axes.set_xlabel("key position", fontsize=7)
        axes.set_ylabel("query position", fontsize=7)
        axes.tick_params(labelsize=6)
    figure.suptitle(f"{spec.name}: N={n}, H={num_heads}, density {density(spec, n, num_heads):.3f}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temp:
        figure.savefig(temp, format="png", dpi=120)
