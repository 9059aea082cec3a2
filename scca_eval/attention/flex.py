"""Pattern attention through FlexAttention: one kernel call, block-sparse.

Every head rule of docs/patterns.md fits one formula with five per-head
parameters (see ``_rule_parameters``), so a single ``mask_mod`` serves every
head of a layer: it looks its head's parameters up in small tensors. The
kernel only calls ``mask_mod`` inside *partial* blocks; blocks that a rule
allows completely run unmasked and blocks it forbids are skipped. Which block
is which is worked out once per (pattern, length, heads, device, block size)
straight from :meth:`Rule.allows` and cached.

Dilated rules touch every block in natural order. When a pattern has them, the
tokens are reordered by residue (``p mod R``, then ``p // R``, with R the least
common multiple of the dilation rates), which makes ``dilated(r, j)`` a few
dense triangles again; ``mask_mod`` reads the original positions through the
reordering, and the output is put back in natural order. With
``split_layouts=True`` the heads are split instead into runs that do and do
not need the reordering, one kernel call each, so chunk heads keep the cheaper
natural layout (the default; benchmarks/README.md, FlexAttention tuning).

On CUDA the kernel is compiled (``torch.compile``); elsewhere FlexAttention's
eager implementation runs, which materializes the scores: fine for tests and
short windows, and still exact. Gradients flow through FlexAttention's own
backward, which PyTorch provides on CUDA only: off CUDA this backend refuses
inputs that need gradients.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..errors import UserError
from ..patterns.rules import Rule
from ..patterns.spec import PatternSpec
from .auto import mode_of
from .plan_cache import PlanCache

# Kernel options used unless the caller passes its own. Not ROWS_GUARANTEED_SAFE,
# although every query attends some key: the Triton kernel drops its guard in
# every tile, so a row with no key in the first tile it visits (the strictly
# causal residue blocks of dilated rules, chunks that do not start on a tile)
# turns into NaN. USE_TMA stays off: it did not pay at every length
# (benchmarks/README.md, FlexAttention tuning).
DEFAULT_KERNEL_OPTIONS: dict = {}
# Tiles on Hopper GPUs (compute capability 9.0) at head dims up to 64. Forward: Triton's
# default (128 x 128 with 4 warps) ran the sparse presets' forward at about half the speed of
# 64 x 128. Backward: 64 x 64 with 4 warps rather than Triton's 64 x 128 / 128 x 64 with 8
# (benchmarks/README.md, FlexAttention tiles and the fourteenth round).
HOPPER_SMALL_HEAD_FORWARD_TILE: dict = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_stages": 3,
                                        "fwd_num_warps": 4}
HOPPER_SMALL_HEAD_BACKWARD_TILE: dict = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                         "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 4}
HOPPER_SMALL_HEAD_TILES: dict = {**HOPPER_SMALL_HEAD_FORWARD_TILE, **HOPPER_SMALL_HEAD_BACKWARD_TILE}
# Split heads into dilated and other runs (one kernel call each) by default:
# it was faster for mixes of both (benchmarks/README.md, FlexAttention tuning).
DEFAULT_SPLIT_LAYOUTS = True
DEFAULT_BLOCK_SIZE = 128
# Grouped-query attention through the kernel's own enable_gqa (False), or, for calls whose
# gradients will be taken, with each key/value head repeated per query head first (True): the
# backward's key/value programs then run per query head rather than per key/value head, more
# programs at few key/value heads, at the cost of the copy and of summing the repeated heads'
# gradients. A forward alone gains nothing: its grid already has a program per query head.
# Off: timed at the SmolLM2 head shape it was slower for most presets (benchmarks/README.md,
# thirteenth round).
DEFAULT_REPEAT_KV = False

# Cached plans (block masks and reorderings); a 32k plan for 32 heads is ~20 MB.
_PLAN_CACHE_SIZE = 32
# Elements of the [rows, N] rule tile evaluated at once when blocks are classified.
_TILE_ELEMENTS = 1 << 24


# -- per-head parameters --------------------------------------------------------
def _rule_parameters(rules: list[Rule], chunk: int, n: int) -> torch.Tensor:
    """int32 [5, H]: chunk, shift, distance, rate, offset of each head.

    One formula covers every rule (``_allowed``):
      chunk_ok:   c(q) == c(k) with c(p) = (p + shift) // chunk, or for cross,
                  c(k) == c(q) - distance where that chunk exists;
      dilated_ok: (q - k) mod rate == offset, or q < offset and k == q.
    ``causal`` and ``dilated`` heads get a chunk longer than the window (so
    chunk_ok always holds); chunk heads get rate 1, offset 0 (dilated_ok holds).
    """
    rows = []
    for rule in rules:
        if rule.kind in ("causal", "dilated"):
            row = (n + 1, 0, 0, 1, 0)
        else:
            shift = rule.shift_for(chunk) if rule.kind == "shifted" else 0
            distance = rule.distance if rule.kind == "cross" else 0
            row = (chunk, shift, distance, 1, 0)
        if rule.kind == "dilated":
            row = row[:3] + (rule.rate, rule.offset)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32).T.contiguous()


def _allowed(q, k, chunk, shift, distance, rate, offset):
    """The rule formula of ``_rule_parameters`` (elementwise; works inside mask_mod)."""
    chunk_q = (q + shift) // chunk
    chunk_k = (k + shift) // chunk
    chunk_ok = torch.where(chunk_q >= distance, chunk_k == chunk_q - distance, chunk_k == chunk_q)
    dist = q - k
    dilated_ok = ((dist % rate) == offset) | ((q < offset) & (dist == 0))
    return (k <= q) & chunk_ok & dilated_ok


def _make_mask_mod(params: torch.Tensor, positions: torch.Tensor, first_head: int):
    """mask_mod(b, h, q_idx, kv_idx) for heads ``first_head + h``.

    ``positions[i]`` is the original position of the token at layout index i
    (padded past N with positions after every real query, so padded keys are
    never allowed).
    """
    chunk, shift, distance, rate, offset = (params[i, first_head:].contiguous() for i in range(5))

    def mask_mod(b, h, q_idx, kv_idx):
        q = positions[q_idx]
        k = positions[kv_idx]
        return _allowed(q, k, chunk[h], shift[h], distance[h], rate[h], offset[h])

    return mask_mod


# -- block classification -------------------------------------------------------
def _rule_blocks(rule: Rule, positions: torch.Tensor, chunk: int, block_q: int, block_k: int):
    """(partial, full) bool [nq, nk] for one rule in the layout given by ``positions``.

    A block is full when the rule allows every (query, key) pair of it that lies
    inside the window, partial when it allows some. Evaluated with Rule.allows,
    a tile of rows at a time.
    """
    n = positions.numel()
    nq, nk = -(-n // block_q), -(-n // block_k)
    counts = torch.zeros(nq, nk, dtype=torch.int64, device=positions.device)
    rows_per_tile = block_q * max(1, _TILE_ELEMENTS // (block_q * nk * block_k))
    keys = positions[None, :]
    for start in range(0, n, rows_per_tile):
        queries = positions[start:start + rows_per_tile]
        allowed = rule.allows(queries[:, None], keys, chunk).to(torch.int32)
        rows = queries.numel()
        padded_rows = -(-rows // block_q) * block_q
        allowed = torch.nn.functional.pad(allowed, (0, nk * block_k - n, 0, padded_rows - rows))
        tile = allowed.view(padded_rows // block_q, block_q, nk, block_k).sum(dim=(1, 3))
        counts[start // block_q:start // block_q + tile.shape[0]] = tile
    valid_q = (n - torch.arange(nq, device=positions.device) * block_q).clamp(max=block_q)
    valid_k = (n - torch.arange(nk, device=positions.device) * block_k).clamp(max=block_k)
    area = valid_q[:, None] * valid_k[None, :]
    full = counts == area
    return (counts > 0) & ~full, full


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [..., nk] -> (count int32 [...], indices int32 [..., nk]) with the True columns first."""
    count = dense.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count, indices


# -- plans ----------------------------------------------------------------------
@dataclass
class _Part:
    """One kernel call: heads [first, end) in one token layout."""

    first: int
    end: int
    modulus: int  # the residue layout's R (1: natural order)
    order: torch.Tensor | None  # layout index -> position (None: natural order)
    inverse: torch.Tensor | None  # position -> layout index
    block_mask: BlockMask


@dataclass
class _Plan:
    parts: list[_Part]


def _residue_order(n: int, modulus: int, device) -> torch.Tensor:
    """Positions ordered by residue mod ``modulus`` (p mod R, then p // R)."""
    return torch.cat([torch.arange(a, n, modulus, device=device) for a in range(modulus)])


def _to_residue_layout(x: torch.Tensor, part: _Part) -> torch.Tensor:
    """[B, h, N, D] in natural order -> in ``part``'s residue order."""
    n = x.shape[2]
    if n % part.modulus:
        return x.index_select(2, part.order)
    # Position p = i * R + a sits at (i, a); the residue order wants (a, i). A transposed copy,
    # whose backward is one too (index_select's backward is an atomic scatter-add, slower).
    return x.unflatten(2, (n // part.modulus, part.modulus)).transpose(2, 3).flatten(2, 3)


def _from_residue_layout(x: torch.Tensor, part: _Part) -> torch.Tensor:
    """The inverse of ``_to_residue_layout``."""
    n = x.shape[2]
    if n % part.modulus:
        return x.index_select(2, part.inverse)
    return x.unflatten(2, (part.modulus, n // part.modulus)).transpose(2, 3).flatten(2, 3)


def _layout_modulus(rules: list[Rule]) -> int:
    rates = {rule.rate for rule in rules if rule.kind == "dilated" and rule.rate > 1}
    return math.lcm(*rates) if rates else 1


def _build_part(spec: PatternSpec, n: int, rules: list[Rule], params: torch.Tensor, first: int, end: int,
                block_size: tuple[int, int], device: torch.device) -> _Part:
    block_q, block_k = block_size
    part_rules = rules[first:end]
    modulus = _layout_modulus(part_rules)
    if modulus > 1:
        order = _residue_order(n, modulus, device)
        inverse = torch.argsort(order)
    else:
        order = inverse = None
    positions = order if order is not None else torch.arange(n, device=device)
    chunk = spec.chunk_for(n)

    distinct = list(dict.fromkeys(part_rules))
    partial, full = zip(*(_rule_blocks(rule, positions, chunk, block_q, block_k) for rule in distinct))
    head_index = torch.tensor([distinct.index(rule) for rule in part_rules], device=device)
    partial = torch.stack(partial)[head_index][None]  # [1, h, nq, nk]
    full = torch.stack(full)[head_index][None]
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)

    # Pad the position lookup so that mask_mod never indexes past it, whatever
    # the kernel does in a last, partial block; padded positions come after
    # every real one, so causality masks them.
    padded = -(-n // max(block_size)) * max(block_size) + max(block_size)
    lookup = torch.cat([positions, torch.arange(n, padded, device=device)]).to(torch.int32)
    mask_mod = _make_mask_mod(params.to(device), lookup, first)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                          mask_mod=mask_mod, seq_lengths=(n, n))
    return _Part(first, end, modulus, order, inverse, block_mask)


def _split_points(rules: list[Rule], per_kv: int) -> list[tuple[int, int]]:
    """Head runs that need the residue layout and runs that do not.

    A run boundary must fall on a key/value head boundary (grouped-query
    attention), otherwise the heads stay in one call.
    """
    runs: list[tuple[int, int]] = []
    for head, rule in enumerate(rules):
        dilated = rule.kind == "dilated"
        if runs and (rules[runs[-1][0]].kind == "dilated") == dilated:
            runs[-1] = (runs[-1][0], head + 1)
        else:
            runs.append((head, head + 1))
    if any(first % per_kv for first, _ in runs):
        return [(0, len(rules))]
    return runs


def _build_plan(spec: PatternSpec, n: int, num_heads: int, per_kv: int, device: str,
                block_size: tuple[int, int], split_layouts: bool) -> _Plan:
    device = torch.device(device)
    rules = spec.head_rules(n, num_heads)
    params = _rule_parameters(rules, spec.chunk_for(n), n)
    bounds = _split_points(rules, per_kv) if split_layouts else [(0, num_heads)]
    return _Plan([_build_part(spec, n, rules, params, first, end, block_size, device)
                  for first, end in bounds])


_plans: PlanCache[_Plan] = PlanCache(_build_plan, _PLAN_CACHE_SIZE)


def _plan(spec: PatternSpec, n: int, num_heads: int, per_kv: int, device: torch.device,
          block_size: tuple[int, int], split_layouts: bool) -> _Plan:
    return _plans.get(spec, n, num_heads, per_kv, str(device), block_size, split_layouts)


def clear_cache() -> None:
    """Forget every cached block mask (e.g. between benchmark runs)."""
    _plans.clear()


# -- the kernel -----------------------------------------------------------------
_compiled = None


def _compiled_flex():
    """flex_attention compiled once per process (fixed shapes: no dynamic kernels)."""
    global _compiled
    if _compiled is None:
        # Each (length, kernel options) pair is one compiled entry; the default
        # limit of 8 would silently fall back to the eager kernel, which
        # materializes [H, N, N] scores and runs out of memory at long lengths.
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)

        def kernel(*args, **kwargs):
            if torch.compiler.is_compiling():  # traced into a compiled layer: part of its graph
                return compiled(*args, **kwargs)
            # Called eagerly, also where the engine runs a layer eagerly on purpose
            # (force_eager stance, see evaluation/engine.py): still the fused kernel.
            with torch.compiler.set_stance("default"):
                return compiled(*args, **kwargs)

        _compiled = kernel
    return _compiled


def _eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        # The eager kernel warns that it is unfused; on CPU that is expected.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        kwargs.pop("kernel_options", None)
        return flex_attention(*args, **kwargs)


_kernel_options: dict = {}


def default_kernel_options(q: torch.Tensor) -> dict:
    """The kernel options used for ``q`` where the caller passes none (cached per device,
    dtype and head dimension; a copy is the caller's to change)."""
    key = (q.device, q.dtype, q.shape[-1])
    # A plain read, so that torch.compile traces it without a break: dynamo does not fold the
    # compute-capability query into a constant, so asking it inside a compiled layer may break
    # the graph at every call. The first pass of a compiled model runs eagerly (engine,
    # trainer) and fills the cache.
    known = _kernel_options.get(key)
    if known is None:
        known = _kernel_options[key] = dict(DEFAULT_KERNEL_OPTIONS)
        if (q.device.type == "cuda" and q.shape[-1] <= 64 and q.dtype in (torch.bfloat16, torch.float16)
                and torch.cuda.get_device_capability(q.device) == (9, 0)):
            known.update(HOPPER_SMALL_HEAD_TILES)
    return dict(known)


def _as_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, int):
        return (block_size, block_size)
    return tuple(int(b) for b in block_size)


def flex_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                           scaling: float, *, block_size: int | tuple[int, int] | None = None,
                           kernel_options: dict | None = None, split_layouts: bool | None = None,
                           repeat_kv: bool | None = None, compile: bool | None = None) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D] and k, v [B, H_kv, N, D] -> [B, H, N, D].

    block_size:     sparse block size (int or (query, key)); default 128.
    kernel_options: FlexAttention kernel options (default ``default_kernel_options(q)``).
    split_layouts:  one call for the dilated heads (residue layout) and one for
                    the others (natural layout) instead of one call for all
                    (default DEFAULT_SPLIT_LAYOUTS; only where the split falls on a
                    key/value head boundary, which every head is with repeat_kv).
    repeat_kv:      repeat each key/value head per query head before the kernel
                    instead of passing enable_gqa (default: DEFAULT_REPEAT_KV where
                    gradients will be taken, else off).
    compile:        compile the kernel (default: on CUDA only).
    """
    batch, num_heads, n, _ = q.shape
    kv_heads = k.shape[1]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"pattern attention needs as many keys as queries, got {n} queries and {k.shape[2]} keys")
    if num_heads % kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {kv_heads} key/value heads evenly")
    per_kv = num_heads // kv_heads
    backward = mode_of(q, k, v) == "fwd+bwd"
    if q.device.type != "cuda" and backward:
        # PyTorch's FlexAttention has no backward off CUDA; say so before the kernel fails deep inside
        raise UserError("the flex attention backend trains only on a CUDA GPU (FlexAttention has no CPU "
                        "backward); use the auto or chunked attention backend here")
    if compile is None:
        compile = q.device.type == "cuda"
    kernel = _compiled_flex() if compile else _eager_flex
    options = default_kernel_options(q) if kernel_options is None else dict(kernel_options)
    block = _as_pair(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    if split_layouts is None:
        split_layouts = DEFAULT_SPLIT_LAYOUTS
    if repeat_kv is None:
        repeat_kv = DEFAULT_REPEAT_KV and backward
    if repeat_kv and per_kv > 1:
        k, v = (x.repeat_interleave(per_kv, dim=1) for x in (k, v))
        per_kv = 1  # from here each query head has its own key/value head: a group of one

    plan = _plan(spec, n, num_heads, per_kv, q.device, block, split_layouts)
    outputs = []
    for part in plan.parts:
        kv_first, kv_end = part.first // per_kv, -(-part.end // per_kv)
        pq, pk, pv = q[:, part.first:part.end], k[:, kv_first:kv_end], v[:, kv_first:kv_end]
        if part.order is not None:
            pq, pk, pv = (_to_residue_layout(x, part) for x in (pq, pk, pv))
        out = kernel(pq, pk, pv, block_mask=part.block_mask, scale=scaling,
                     enable_gqa=per_kv > 1, kernel_options=options)
        if part.inverse is not None:
            out = _from_residue_layout(out, part)
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
