"""Shared token runs between documents: how training text is checked against evaluation text.

A training document *overlaps* an evaluation document when both hold the same run of
``n`` consecutive token ids. Every run is reduced to a 64-bit polynomial hash; two
different runs may share a hash (probability about 2**-64 per pair), so a match can only
err towards reporting an overlap, never towards missing one.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

RUN_LENGTH = 50
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so the hash is a bijection of each new token


def run_hashes(ids, n: int = RUN_LENGTH) -> np.ndarray:
    """The hash of every run of ``n`` consecutive ids (``len(ids) - n + 1`` of them)."""
    ids = np.asarray(ids, dtype=np.uint64)
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for offset in range(n):
            hashes = hashes * _BASE + ids[offset:offset + count] + np.uint64(1)
    return hashes


def hash_set(documents: Iterable, n: int = RUN_LENGTH) -> np.ndarray:
    """Sorted unique run hashes of all ``documents`` (sequences of token ids)."""
    parts = [run_hashes(ids, n) for ids in documents]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


def shared_run_starts(ids, reference: np.ndarray, n: int = RUN_LENGTH) -> np.ndarray:
    """Positions in ``ids`` where a run of ``n`` ids starts that also occurs in the
    documents whose :func:`hash_set` (sorted, unique) is ``reference``. A binary search per
    run, so a large text is scanned against a small reference, or the other way round, fast."""
    hashes = run_hashes(ids, n)
    if len(reference) == 0 or len(hashes) == 0:
        return np.zeros(0, dtype=np.int64)
    where = np.minimum(np.searchsorted(reference, hashes), len(reference) - 1)
    return np.flatnonzero(reference[where] == hashes)


def documents_sharing_runs(scanned: dict[str, object], reference: np.ndarray,
                           n: int = RUN_LENGTH) -> dict[str, int]:
    """For each document of ``scanned`` (id -> token ids) that shares runs of ``n`` ids with
    the documents whose :func:`hash_set` is ``reference``: how many of its runs it shares."""
    found = {}
    for doc_id, ids in scanned.items():
        count = len(shared_run_starts(ids, reference, n))
        if count:
            found[doc_id] = count
    return found
