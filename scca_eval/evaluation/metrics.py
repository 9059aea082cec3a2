"""Perplexity, bits per byte, word perplexity, and bootstrap intervals over documents.

Definitions (lm-evaluation-harness's for the byte and word metrics, so models with
different tokenizers can be compared on the same text):

* perplexity      = exp(sum NLL / scored tokens)
* bits_per_byte   = sum NLL / (UTF-8 bytes * ln 2)
* byte_perplexity = exp(sum NLL / UTF-8 bytes)
* word_perplexity = exp(sum NLL / words), words = len(re.split(r"\\s+", text))

NLL is in nats. The byte and word counts are those of the text the scored tokens belong
to (a document, or the prefix of it that was evaluated).

The uncertainty comes from which documents happened to be in the data: the bootstrap
resamples whole documents with replacement and recomputes the ratio
sum NLL / sum tokens, so long documents weigh by their length, as in the estimate itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import UserError

# Resample in steps of about this many (resample, document) cells, so that memory stays
# small for data sets of many documents.
_CELLS = 1 << 22


@dataclass(frozen=True)
class DocScore:
    """One document's summed NLL (nats) over its scored tokens, and its size."""

    id: str
    nll_sum: float
    tokens: int
    bytes: int | None = None
    words: int | None = None


def _resampled_sums(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap sums: row b is values summed over n documents drawn with replacement.

    ``values`` is [n, k] (k quantities per document); returns [n_boot, k].
    """
    rng = np.random.default_rng(seed)
    n = len(values)
    out = np.empty((n_boot, values.shape[1]), dtype=np.float64)
    chunk = max(1, min(n_boot, _CELLS // n))
    for begin in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - begin)
        picks = rng.integers(0, n, size=(rows, n))
        # How often each document is drawn in each resample, then one matrix product:
        # the same sums as indexing, without a [rows, n, k] array.
        flat = (np.arange(rows)[:, None] * n + picks).ravel()
        counts = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)
        out[begin:begin + rows] = counts @ values
    return out


def _percentile_interval(samples: np.ndarray) -> list[float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def summarize(docs: Sequence[DocScore], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Aggregate metrics over documents, with a seeded 95% bootstrap interval of perplexity.

    ``ci95`` is None with fewer than two documents (there is nothing to resample).
    ``bits_per_byte``, ``byte_perplexity`` and ``word_perplexity`` are None when any
    document's byte or word count is unknown (e.g. a pre-tokenized stream).
    """
    if not docs:
        raise UserError("no documents were scored; check the data and --max-tokens")
    nll = np.array([d.nll_sum for d in docs], dtype=np.float64)
    tokens = np.array([d.tokens for d in docs], dtype=np.float64)
    total_nll = math.fsum(nll)
    total_tokens = int(tokens.sum())
    if total_tokens <= 0:
        raise UserError("no tokens were scored; every document needs at least two tokens")
    n_bytes = None if any(d.bytes is None for d in docs) else int(sum(d.bytes for d in docs))
    n_words = None if any(d.words is None for d in docs) else int(sum(d.words for d in docs))

    ci95 = None
    if len(docs) >= 2 and n_boot > 0:
        sums = _resampled_sums(np.stack([nll, tokens], axis=1), n_boot, seed)
        ci95 = _percentile_interval(np.exp(sums[:, 0] / sums[:, 1]))

    return {
        "perplexity": math.exp(total_nll / total_tokens),
        "nll_sum": total_nll,
        "tokens": total_tokens,
        "mean_nll": total_nll / total_tokens,
        "bytes": n_bytes,
        "words": n_words,
        "bits_per_byte": total_nll / (n_bytes * math.log(2)) if n_bytes else None,
        "byte_perplexity": math.exp(total_nll / n_bytes) if n_bytes else None,
        "word_perplexity": math.exp(total_nll / n_words) if n_words else None,
        "ci95": ci95,
        "documents": len(docs),
        "bootstrap": {"samples": n_boot, "seed": seed, "unit": "document"},
    }


def paired_bootstrap(base: Mapping[str, tuple[float, int]], new: Mapping[str, tuple[float, int]], *,
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """Is ``new``'s perplexity different from ``base``'s on the same documents?

    Both map document id -> (NLL sum, scored tokens). The statistic is the log ratio
    d = log(ppl_new / ppl_base) = (sum NLL_new - sum NLL_base) / sum tokens; documents are
    resampled with replacement, the same draws for both sides (paired). Returns the
    relative change ppl_new / ppl_base - 1, its 95% percentile interval, and a two-sided
    p-value 2 * min(share of resampled d <= 0, share >= 0) (with the +1 correction, so it
    is never 0); a p-value below 0.05 goes with an interval that excludes 0. With fewer
    than two documents the interval and p-value are None.
    """
    if set(base) != set(new):
        only_base = sorted(set(base) - set(new))
        only_new = sorted(set(new) - set(base))
        example = (only_base or only_new)[0]
        raise UserError(f"the two results cover different documents ({len(only_base)} only in the base, "
                        f"{len(only_new)} only in the new one, e.g. {example!r}); compare runs on the same "
                        "task data and --max-tokens")
    if not base:
        raise UserError("no documents to compare")
    ids = sorted(base)
    mismatched = [i for i in ids if int(base[i][1]) != int(new[i][1])]
    if mismatched:
        raise UserError(f"document {mismatched[0]!r} has {base[mismatched[0]][1]} scored tokens in the base and "
                        f"{new[mismatched[0]][1]} in the new result; compare runs with the same tokenizer, "
                        "ctx, stride and --max-tokens")
    nll_base = np.array([base[i][0] for i in ids], dtype=np.float64)
    nll_new = np.array([new[i][0] for i in ids], dtype=np.float64)
    tokens = np.array([base[i][1] for i in ids], dtype=np.float64)
    total_tokens = tokens.sum()
    if total_tokens <= 0:
        raise UserError("no scored tokens to compare")
    ppl_base = math.exp(math.fsum(nll_base) / total_tokens)
    ppl_new = math.exp(math.fsum(nll_new) / total_tokens)
    result = {
        "base_perplexity": ppl_base,
        "new_perplexity": ppl_new,
        "relative_change": ppl_new / ppl_base - 1.0,
        "ci95": None,
        "p_value": None,
        "documents": len(ids),
        "bootstrap": {"samples": n_boot, "seed": seed, "unit": "document", "paired": True},
    }
    if len(ids) >= 2 and n_boot > 0:
        result.update(_paired_test(np.stack([nll_new - nll_base, tokens], axis=1), n_boot, seed))
    return result


def _paired_test(units: np.ndarray, n_boot: int, seed: int) -> dict:
    """Interval and p-value of the log ratio from [n, 2] rows (NLL difference, tokens) per unit."""
    sums = _resampled_sums(units, n_boot, seed)
    log_ratio = sums[:, 0] / sums[:, 1]
    at_most = int(np.count_nonzero(log_ratio <= 0))
    at_least = int(np.count_nonzero(log_ratio >= 0))
    return {"ci95": _percentile_interval(np.expm1(log_ratio)),
            "p_value": min(1.0, 2.0 * (min(at_most, at_least) + 1) / (n_boot + 1))}


def paired_block_bootstrap(base: Mapping[str, tuple[np.ndarray, np.ndarray]],
                           new: Mapping[str, tuple[np.ndarray, np.ndarray]], *, block: int,
                           n_boot: int = 2000, seed: int = 0) -> dict:
    """:func:`paired_bootstrap` for few documents: resamples contiguous blocks of windows.

    Both map document id -> (per-window NLL sums, per-window scored tokens), windows in
    document order. Each document's windows are cut into consecutive blocks of ``block``
    windows (its last block may be shorter; blocks never cross documents), and the blocks
    are resampled with replacement, paired, as documents are by :func:`paired_bootstrap`
    (a non-overlapping block bootstrap: the loss of neighbouring windows is correlated,
    and a block keeps that together). Same statistic, interval and p-value."""
    if set(base) != set(new):
        raise UserError("the two results cover different documents; compare runs on the same task data")
    ids = sorted(base)
    diffs, counts = [], []
    for doc_id in ids:
        (nll_base, tokens_base), (nll_new, tokens_new) = base[doc_id], new[doc_id]
        if len(tokens_base) != len(tokens_new) or not np.array_equal(tokens_base, tokens_new):
            raise UserError(f"document {doc_id!r} has other windows in the base and the new result; compare "
                            "runs with the same ctx, stride and --last-window")
        for begin in range(0, len(tokens_base), block):
            diffs.append(math.fsum(nll_new[begin:begin + block]) - math.fsum(nll_base[begin:begin + block]))
            counts.append(int(tokens_base[begin:begin + block].sum()))
    result = paired_bootstrap({i: (math.fsum(base[i][0]), int(np.sum(base[i][1]))) for i in ids},
                              {i: (math.fsum(new[i][0]), int(np.sum(new[i][1]))) for i in ids}, n_boot=0)
    result.update(_paired_test(np.stack([np.array(diffs), np.array(counts, dtype=np.float64)], axis=1),
                               n_boot, seed))
    result["bootstrap"] = {"samples": n_boot, "seed": seed, "unit": "block of windows", "paired": True,
                           "block": block, "blocks": len(diffs)}
    return result
