"""A candidate fast path measured by the attention benchmark (backend ``strided``).

The same decomposition as ``attention/chunked.py`` (every head rule as causal
or plain SDPA calls over chunks or residue classes), but each call reads q, k
and v through strided *views* of the ``[B, N, H, D]`` tensors that transformers
hands over, instead of copies: chunks are a reshape of the position axis, a
residue class is every r-th position, a head group is a slice of the head
axis. Each output element is written once, straight into a ``[B, N, H, D]``
buffer, so the transpose that follows attention in transformers is free.

It exists to measure what the copies of the chunked layout cost; where a view
is impossible (a batch above 1 with ``cross``, a head group that splits a
key/value head, a length that is not a multiple of the chunk or of the rate)
it falls back to ``chunked_pattern_attention`` for that head group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention.chunked import chunked_pattern_attention
from ..patterns.spec import PatternSpec


def _sdpa(q, k, v, causal: bool, scaling: float):
    """SDPA over [batch, L, h, D] views; returns [batch, L, h, D]."""
    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scaling, **gqa)
    return out.transpose(1, 2)


def strided_pattern_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec,
                              scaling: float) -> torch.Tensor:
    """Attention of ``spec`` for q [B, H, N, D], k, v [B, H_kv, N, D] -> [B, H, N, D] ([B, N, H, D] in memory)."""
    batch, heads, n, _ = q.shape
    per_kv = heads // k.shape[1]
    chunk = spec.chunk_for(n)
    qn, kn, vn = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, h, D] views
    out = q.new_empty(batch, n, heads, v.shape[-1])
    for first, end, rule in spec.head_groups(n, heads):
        if first % per_kv or end % per_kv:
            out[:, :, first:end] = chunked_pattern_attention(
                q[:, first:end], k.repeat_interleave(per_kv, 1)[:, first:end],
                v.repeat_interleave(per_kv, 1)[:, first:end], _single(rule, spec), scaling).transpose(1, 2)
            continue
        gq = qn[:, :, first:end]
        gk, gv = (x[:, :, first // per_kv:end // per_kv] for x in (kn, vn))
        o = out[:, :, first:end]
        if not _rule_views(rule, gq, gk, gv, o, chunk, scaling):
            out[:, :, first:end] = chunked_pattern_attention(
                gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2), _single(rule, spec),
                scaling).transpose(1, 2)
    return out.transpose(1, 2)


def _single(rule, spec: PatternSpec) -> PatternSpec:
    from fractions import Fraction

    return PatternSpec("one", ((Fraction(1), rule),), chunk_size=spec.chunk_size, chunk_ratio=spec.chunk_ratio)


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, L, h, D] with L a multiple of chunk -> [B * L/chunk, chunk, h, D].

    A view for a whole window (or B = 1); reshape copies only where no view exists.
    """
    b, length, h, d = x.shape
    return x.reshape(b * (length // chunk), chunk, h, d)


def _local_into(o, q, k, v, chunk: int, scaling: float) -> None:
    """Causal attention within consecutive chunks (the last may be shorter), [B, L, h, D] views."""
    length = q.shape[1]
    whole = length // chunk * chunk
    if whole:
        res = _sdpa(_chunks(q[:, :whole], chunk), _chunks(k[:, :whole], chunk), _chunks(v[:, :whole], chunk),
                    True, scaling)
        o[:, :whole].copy_(res.reshape(q.shape[0], whole, q.shape[2], -1))
    if whole < length:
        o[:, whole:].copy_(_sdpa(q[:, whole:], k[:, whole:], v[:, whole:], True, scaling))


def _rule_views(rule, q, k, v, o, chunk: int, scaling: float) -> bool:
    """Write the rule's attention into o; False when no view-only layout applies."""
    n = q.shape[1]
    if rule.kind == "causal":
        o.copy_(_sdpa(q, k, v, True, scaling))
        return True
    if rule.kind == "local" or (rule.kind == "cross" and rule.distance == 0):
        _local_into(o, q, k, v, chunk, scaling)
        return True
    if rule.kind == "shifted":
        head = min(n, chunk - rule.shift_for(chunk) % chunk)
        if head == chunk:  # a shift of whole chunks is no shift
            _local_into(o, q, k, v, chunk, scaling)
            return True
        o[:, :head].copy_(_sdpa(q[:, :head], k[:, :head], v[:, :head], True, scaling))
        _local_into(o[:, head:], q[:, head:], k[:, head:], v[:, head:], chunk, scaling)
        return True
    if rule.kind == "cross":
        d = rule.distance
        start = min(n, d * chunk)
        # the first d chunks have no chunk d steps back: local
        _local_into(o[:, :start], q[:, :start], k[:, :start], v[:, :start], chunk, scaling)
        whole = start + (n - start) // chunk * chunk  # query chunks of full length
        if whole > start:
            keys = slice(0, whole - start)
            res = _sdpa(_chunks(q[:, start:whole], chunk), _chunks(k[:, keys], chunk), _chunks(v[:, keys], chunk),
                        False, scaling)
            o[:, start:whole].copy_(res.reshape(q.shape[0], whole - start, q.shape[2], -1))
        if whole < n:  # a shorter last chunk sees all of its chunk d steps back
            keys = slice(whole - start, whole - start + chunk)
            o[:, whole:].copy_(_sdpa(q[:, whole:], k[:, keys], v[:, keys], False, scaling))
        return True
    # dilated(r, j): residue class a (positions a, a + r, ...) sees class (a - j) mod r
    r, j = rule.rate, rule.offset
    if n % r:
        return False
    qc, kc, vc = (x.unflatten(1, (n // r, r)) for x in (q, k, v))  # [B, N/r, r, h, D] views
    oc = o.unflatten(1, (n // r, r))
    per_kv = q.shape[2] // k.shape[2]
    for a in range(r):
        c = (a - j) % r
        if a >= j:
            oc[:, :, a].copy_(_sdpa(qc[:, :, a], kc[:, :, c], vc[:, :, c], True, scaling))
        else:  # strictly earlier keys: causal with the queries one step ahead; row 0 attends itself
            if n // r > 1:
                oc[:, 1:, a].copy_(_sdpa(qc[:, 1:, a], kc[:, :-1, c], vc[:, :-1, c], True, scaling))
            oc[:, 0, a].copy_(vc[:, 0, a].repeat_interleave(per_kv, dim=1))
    return True


# -- inside a model, for the model benchmark --------------------------------------
IMPLEMENTATION = "scca_bench_strided"
_specs: dict[int, PatternSpec] = {}


def _model_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """AttentionInterface entry: [B, H, N, D] in, ([B, N, H, D], None) out, like transformers' own."""
    spec = _specs.get(id(module.config))
    if spec is None:
        raise RuntimeError("use_strided_attention(model, spec) was not called for this model")
    if scaling is None:
        scaling = module.scaling
    out = strided_pattern_attention(query, key, value, spec, scaling)
    return out.transpose(1, 2), None  # already [B, N, H, D] in memory: no copy


def use_strided_attention(model, spec: PatternSpec):
    """Run ``model`` under ``spec`` with the strided layout (through transformers' AttentionInterface).

    Undo with ``model.set_attn_implementation("sdpa")`` or ``apply_pattern``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

    from ..attention.register import check_architecture, scca_mask

    check_architecture(model)
    AttentionInterface.register(IMPLEMENTATION, _model_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, scca_mask)  # no dense mask: every pattern is causal
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            _specs[id(module.config)] = spec
    model.set_attn_implementation(IMPLEMENTATION)
    return model
