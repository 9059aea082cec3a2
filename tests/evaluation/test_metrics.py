"""Metrics against hand computations, and the bootstrap's reproducibility and correctness."""

import math

import numpy as np
import pytest

from scca_eval.errors import UserError
from scca_eval.evaluation.metrics import DocScore, paired_bootstrap, summarize


def test_summary_by_hand():
    docs = [DocScore("a", 10.0, 5, bytes=20, words=4), DocScore("b", 6.0, 3, bytes=10, words=2)]
    m = summarize(docs, n_boot=200)
    assert m["nll_sum"] == 16.0 and m["tokens"] == 8
    assert m["perplexity"] == pytest.approx(math.e ** 2)
    assert m["bits_per_byte"] == pytest.approx(16 / 30 / math.log(2))
    assert m["byte_perplexity"] == pytest.approx(math.exp(16 / 30))
    assert m["word_perplexity"] == pytest.approx(math.exp(16 / 6))
    assert m["bytes"] == 30 and m["words"] == 6 and m["documents"] == 2


def test_unknown_sizes_give_none():
    docs = [DocScore("a", 10.0, 5, bytes=None, words=None), DocScore("b", 6.0, 3, bytes=10, words=2)]
    m = summarize(docs)
    assert m["bits_per_byte"] is None and m["word_perplexity"] is None and m["byte_perplexity"] is None
    assert m["perplexity"] == pytest.approx(math.e ** 2)


def test_one_document_has_no_interval():
    assert summarize([DocScore("a", 3.0, 2)])["ci95"] is None


def test_empty_input_is_a_user_error():
    with pytest.raises(UserError):
        summarize([])
    with pytest.raises(UserError):
        summarize([DocScore("a", 0.0, 0)])


def test_two_document_bootstrap_by_hand():
    # Resamples of two documents are AA, AB, BA or BB (1/4, 1/2, 1/4): with 1000 of them,
    # far more than 2.5% are AA and BB, so the percentile interval is exactly
    # [exp(min per-document ratio), exp(max per-document ratio)].
    docs = [DocScore("a", 10.0, 10), DocScore("b", 30.0, 10)]
    lo, hi = summarize(docs, n_boot=1000, seed=5)["ci95"]
    assert lo == pytest.approx(math.exp(1.0), rel=1e-12)
    assert hi == pytest.approx(math.exp(3.0), rel=1e-12)


def naive_bootstrap(nll, tokens, n_boot, seed):
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(nll), size=len(nll))
        values.append(math.exp(nll[pick].sum() / tokens[pick].sum()))
    return np.percentile(values, [2.5, 97.5])


def test_interval_agrees_with_a_plain_bootstrap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(500, 5000, size=40).astype(float)
    nll = tokens * rng.uniform(1.8, 2.6, size=40)
    docs = [DocScore(str(i), float(a), int(b)) for i, (a, b) in enumerate(zip(nll, tokens))]
    lo, hi = summarize(docs, n_boot=20000, seed=1)["ci95"]
    ref_lo, ref_hi = naive_bootstrap(nll, tokens, 20000, seed=99)  # an independent stream of draws
    point = math.exp(nll.sum() / tokens.sum())
    assert lo < point < hi
    # Monte Carlo noise of either end is about 0.01 of the width here; a 90% instead of a
    # 95% interval would be 0.08 of the width off.
    width = ref_hi - ref_lo
    assert abs(lo - ref_lo) < 0.03 * width and abs(hi - ref_hi) < 0.03 * width


def test_bootstrap_is_reproducible_with_a_seed():
    docs = [DocScore(str(i), float(i * 3 + 7), 5 + i) for i in range(12)]
    assert summarize(docs, seed=3)["ci95"] == summarize(docs, seed=3)["ci95"]
    assert summarize(docs, seed=3)["ci95"] != summarize(docs, seed=4)["ci95"]


# ---------------------------------------------------------------- paired comparison

def _table(nll, tokens):
    return {f"d{i}": (float(a), int(b)) for i, (a, b) in enumerate(zip(nll, tokens))}


def test_paired_identical_results_are_not_significant():
    base = _table([10.0, 20.0, 30.0], [5, 10, 15])
    result = paired_bootstrap(base, dict(base))
    assert result["relative_change"] == 0.0
    assert result["p_value"] == 1.0
    assert result["ci95"] == [0.0, 0.0]


def test_paired_consistent_improvement_by_hand():
    rng = np.random.default_rng(2)
    tokens = rng.integers(100, 1000, size=30)
    nll = tokens * rng.uniform(2.0, 3.0, size=30)
    base = _table(nll, tokens)
    new = _table(nll * 0.9, tokens)
    result = paired_bootstrap(base, new, n_boot=2000, seed=0)
    expected = math.exp(-0.1 * nll.sum() / tokens.sum()) - 1
    assert result["relative_change"] == pytest.approx(expected, rel=1e-12)
    assert result["base_perplexity"] == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    lo, hi = result["ci95"]
    assert lo <= expected <= hi < 0
    assert result["p_value"] == pytest.approx(2 / 2001)  # every resample improves


def test_paired_two_documents_by_hand():
    # Document a gets worse by 1 nat over 10 tokens, b better by 3 nats over 10 tokens.
    base = {"a": (20.0, 10), "b": (20.0, 10)}
    new = {"a": (21.0, 10), "b": (17.0, 10)}
    result = paired_bootstrap(base, new, n_boot=1000, seed=1)
    assert result["relative_change"] == pytest.approx(math.exp(-2 / 20) - 1)
    lo, hi = result["ci95"]  # the AA and BB resamples bound the interval
    assert lo == pytest.approx(math.expm1(-0.3)) and hi == pytest.approx(math.expm1(0.1))
    assert result["p_value"] > 0.05


def test_paired_p_value_and_interval_agree():
    rng = np.random.default_rng(11)
    for trial in range(10):
        tokens = rng.integers(100, 1000, size=20)
        nll = tokens * rng.uniform(2.0, 3.0, size=20)
        shift = rng.normal(0, 0.03, size=20) * tokens
        result = paired_bootstrap(_table(nll, tokens), _table(nll + shift, tokens), n_boot=2000, seed=trial)
        lo, hi = result["ci95"]
        if result["p_value"] < 0.04:
            assert hi < 0 or lo > 0
        if lo > 0 or hi < 0:
            assert result["p_value"] <= 0.06


def test_paired_bootstrap_is_reproducible():
    base = _table([10, 12, 30, 8], [5, 6, 14, 4])
    new = _table([9, 12.5, 29, 8.2], [5, 6, 14, 4])
    assert paired_bootstrap(base, new, seed=7) == paired_bootstrap(base, new, seed=7)


def test_paired_refuses_different_documents():
    with pytest.raises(UserError, match="different documents"):
        paired_bootstrap({"a": (1.0, 2), "b": (1.0, 2)}, {"a": (1.0, 2), "c": (1.0, 2)})
    with pytest.raises(UserError, match="scored tokens"):
        paired_bootstrap({"a": (1.0, 2), "b": (1.0, 2)}, {"a": (1.0, 2), "b": (1.0, 3)})


def test_paired_single_document_has_no_interval():
    result = paired_bootstrap({"a": (10.0, 5)}, {"a": (9.0, 5)})
    assert result["p_value"] is None and result["ci95"] is None
    assert result["relative_change"] == pytest.approx(math.exp(-1 / 5) - 1)
