"""The evaluation windows, checked against independent brute-force and reference loops."""

import math
import random

import numpy as np
import pytest

from scca_eval.errors import UserError
from scca_eval.evaluation.windows import (
    Window,
    limit_scored_tokens,
    longlora_perplexity,
    plan_lm_eval_windows,
    plan_longlora_windows,
    plan_windows,
)


def hf_guide_windows(length, ctx, stride):
    """The Hugging Face perplexity guide's loop, written out: (begin, end, first scored target).

    The guide sets labels = input_ids[begin:end] with all but the last trg_len = end -
    prev_end labels masked; the model shifts labels by one, so label position 0 of a
    window (target `begin`) is never scored.
    """
    out = []
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + ctx, length)
        trg_len = end - prev_end
        first_label = end - trg_len
        out.append((begin, end, max(first_label, begin + 1)))
        prev_end = end
        if end == length:
            break
    return out


def check_protocol(lengths, ctx, stride, windows, last_window="short"):
    """Every target 1..L-1 of every document scored exactly once, within the rules."""
    scored = {doc: np.zeros(length, dtype=int) for doc, length in enumerate(lengths)}
    step = min(stride, ctx - 1)
    for w in windows:
        length = lengths[w.doc]
        assert 0 <= w.start < w.score_from <= w.end <= length, w  # inside its document, context >= 1
        assert w.end - w.start <= ctx
        # A window is as long as ctx allows: only a document's end cuts it short, and a full
        # last window is never cut short when the document has ctx tokens.
        if last_window == "full" and w.end == length:
            assert w.end - w.start == min(ctx, length)
        else:
            assert w.end - w.start == min(ctx, length - w.start)
        scored[w.doc][w.score_from:w.end] += 1
        if w.start > 0:  # later windows: every scored target has at least ctx - step tokens before it
            assert w.score_from - w.start >= ctx - step
    for doc, length in enumerate(lengths):
        counts = scored[doc]
        if length >= 2:
            assert counts[0] == 0
            assert np.all(counts[1:] == 1), (doc, length, counts)
        else:
            assert counts.sum() == 0
        ends = [w.end for w in windows if w.doc == doc]
        assert ends.count(length) == (1 if length >= 2 else 0)  # stop at the first window reaching the end
        assert ends == sorted(ends)


def test_random_documents_every_target_scored_exactly_once():
    rng = random.Random(1234)
    for _ in range(400):
        lengths = [rng.choice([0, 1, 2, 3, rng.randint(2, 200)]) for _ in range(rng.randint(1, 5))]
        ctx = rng.randint(2, 64)
        stride = rng.randint(1, ctx)
        check_protocol(lengths, ctx, stride, plan_windows(lengths, ctx, stride, "short"), "short")
        full = plan_windows(lengths, ctx, stride)
        check_protocol(lengths, ctx, stride, full, "full")
        short = plan_windows(lengths, ctx, stride, "short")
        # The same targets in the same windows; a full last window only adds context.
        assert [(w.doc, w.score_from, w.end) for w in full] == [(w.doc, w.score_from, w.end) for w in short]
        assert all(f.start <= s.start for f, s in zip(full, short))


def test_full_last_window_hand_example():
    # 10 tokens, ctx 4: windows [0,4) [3,7) and a last one ending at 10. Short: [6,10) already
    # full. 9 tokens: the short last window [6,9) scores 7..8 with 1..2 tokens of context;
    # the full one [5,9) gives them 2..3.
    assert plan_windows([9], 4, 4, "short") == [Window(0, 0, 4, 1), Window(0, 3, 7, 4), Window(0, 6, 9, 7)]
    assert plan_windows([9], 4, 4) == [Window(0, 0, 4, 1), Window(0, 3, 7, 4), Window(0, 5, 9, 7)]
    # A document shorter than ctx keeps its one window.
    assert plan_windows([3], 4, 4) == [Window(0, 0, 3, 1)]
    with pytest.raises(UserError, match="last window"):
        plan_windows([9], 4, 4, "long")


@pytest.mark.parametrize("length", [2, 5, 16, 17, 100, 257])
@pytest.mark.parametrize("ctx,stride", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (8, 3), (16, 8), (16, 15)])
def test_overlapping_strides_equal_the_hugging_face_guide(length, ctx, stride):
    windows = plan_windows([length], ctx, stride, "short")
    expected = hf_guide_windows(length, ctx, min(stride, ctx - 1))
    assert [(w.start, w.end, w.score_from) for w in windows] == expected
    check_protocol([length], ctx, stride, windows)


@pytest.mark.parametrize("ctx", [2, 3, 8, 64])
def test_stride_ctx_is_the_same_as_ctx_minus_one(ctx):
    # A window's first token has no context, so disjoint windows overlap by one token.
    assert plan_windows([500, 7], ctx, ctx) == plan_windows([500, 7], ctx, ctx - 1)
    assert plan_windows([10], 4, 4) == [Window(0, 0, 4, 1), Window(0, 3, 7, 4), Window(0, 6, 10, 7)]


def test_windows_never_cross_documents_and_keep_document_order():
    windows = plan_windows([10, 0, 1, 6], 4, 2)
    assert {w.doc for w in windows} == {0, 3}
    assert [w.doc for w in windows] == sorted(w.doc for w in windows)


@pytest.mark.parametrize("ctx,stride", [(1, 1), (0, 1), (4, 0), (4, 5), (4, -1), (2.5, 1), ("8", 2)])
def test_bad_ctx_or_stride_is_a_user_error(ctx, stride):
    with pytest.raises(UserError):
        plan_windows([10], ctx, stride)


# ---------------------------------------------------------------- lm-eval


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 16, 17, 23, 40])
@pytest.mark.parametrize("max_length", [1, 2, 4, 8])
def test_lm_eval_windows_equal_lm_evals_own(n, max_length):
    """Against lm-eval's own get_rolling_token_windows + make_disjoint_window (context_len=1,
    as its loglikelihood_rolling calls them): the same tokens fed, the same tokens scored."""
    utils = pytest.importorskip("lm_eval.utils")
    tokens = list(range(100, 100 + n))
    prefix = 7
    ids = [prefix] + tokens
    theirs = [utils.make_disjoint_window(pair) for pair in utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1)]
    ours = plan_lm_eval_windows([len(ids)], max_length)
    assert len(ours) == len(theirs)
    for w, (context, continuation) in zip(ours, theirs):
        # lm-eval feeds (context + continuation)[-(max_length + 1):][:-1], scores the continuation
        fed = (context + continuation)[-(max_length + 1):][:-1]
        assert ids[w.start:w.start + w.fed] == fed
        assert w.fed == len(fed) <= max_length
        assert ids[w.score_from:w.end] == continuation


# ---------------------------------------------------------------- --max-tokens

def test_limit_scored_tokens_hand_examples():
    # Three long documents share 60 targets: prefixes of 21 tokens (20 targets each).
    assert limit_scored_tokens([100, 50, 300], 10, 60) == [21, 21, 21]
    # At least one whole ctx window per document: the first document alone covers 30 targets.
    assert limit_scored_tokens([100, 50, 300], 40, 30) == [31, 0, 0]
    # A short document leaves its share to the others; 1-token documents keep their length.
    assert limit_scored_tokens([5, 1, 100], 8, 50) == [5, 1, 47]
    # A sliver shorter than one window is left out instead of scored with no context.
    assert limit_scored_tokens([100, 100, 100], 10, 24) == [10, 10, 0]
    assert limit_scored_tokens([100, 100, 100], 10, 30) == [11, 11, 11]
    # A budget beyond the data takes everything.
    assert limit_scored_tokens([5, 9], 4, 1000) == [5, 9]


def test_limit_scored_tokens_properties():
    rng = random.Random(7)
    for _ in range(300):
        lengths = [rng.choice([0, 1, rng.randint(2, 400)]) for _ in range(rng.randint(1, 6))]
        ctx = rng.randint(2, 64)
        budget = rng.randint(1, 1500)
        prefixes = limit_scored_tokens(lengths, ctx, budget)
        assert len(prefixes) == len(lengths)
        scorable_total = sum(n - 1 for n in lengths if n >= 2)
        scored = sum(p - 1 for p in prefixes if p >= 2)
        taken = [i for i, (p, n) in enumerate(zip(prefixes, lengths)) if n >= 2 and p >= 2]
        # Exactly the budget, or less by a left-out sliver shorter than one window.
        shortfall = min(budget, scorable_total) - scored
        assert 0 <= shortfall < ctx
        if shortfall:
            assert taken
        assert all(0 <= p <= n for p, n in zip(prefixes, lengths))
        # Documents are taken in order: no taken document after one that was left out.
        scorable = [i for i, n in enumerate(lengths) if n >= 2]
        assert taken == scorable[: len(taken)]
        # Every taken document but the last gets min(L, P) for one common P >= ctx.
        if len(taken) >= 2:
            full = [prefixes[i] for i in taken[:-1]]
            cap = max(full)
            assert cap >= min(ctx, max(lengths[i] for i in taken[:-1]))
            assert all(prefixes[i] == min(lengths[i], cap) for i in taken[:-1])
        # And the windows of the prefixes score exactly that many targets.
        windows = plan_windows(prefixes, ctx, ctx)
        assert sum(w.scored for w in windows) == scored


def test_limit_scored_tokens_rejects_a_bad_budget():
    with pytest.raises(UserError):
        limit_scored_tokens([10], 4, 0)


# ---------------------------------------------------------------- LongLoRA

def longlora_reference(data, seq_length, batch_size, sliding_window=256):
    """LongLoRA eval.py's get_as_batch, written out: the batches of (x, y) it yields."""
    all_ix = list(range(0, len(data) - seq_length, sliding_window))
    all_ix.pop()
    for idx in range(0, len(all_ix), batch_size):
        ix = all_ix[idx:idx + batch_size]
        assert all(i + seq_length + 1 <= len(data) for i in ix)
        x = np.stack([data[i:i + seq_length] for i in ix])
        y = np.stack([data[i + 1:i + 1 + seq_length] for i in ix])
        yield x, y


@pytest.mark.parametrize("length,ctx", [(2000, 256), (5000, 1024), (1300, 300), (257 + 100, 100), (4096 + 513, 4096)])
def test_longlora_windows_match_its_loop(length, ctx):
    data = np.arange(length, dtype=np.int64) * 7 % 32000
    windows = plan_longlora_windows(length, ctx)
    batches = list(longlora_reference(data, ctx, batch_size=3))
    xs = np.concatenate([x for x, _ in batches])
    assert len(windows) == len(xs)
    for w, x in zip(windows, xs):
        assert np.array_equal(data[w.start:w.end], x)
        # labels = x, shifted inside the model: targets x[1:], i.e. data[start+1 : start+ctx]
        assert w.score_from == w.start + 1 and w.end - w.start == ctx


def test_longlora_needs_a_long_enough_stream():
    assert len(plan_longlora_windows(100 + 257, 100)) == 1
    with pytest.raises(UserError):
        plan_longlora_windows(100 + 256, 100)


def longlora_aggregate(window_losses, batch_size):
    """eval.py's evaluate(): per batch the model's mean loss (= mean of its windows' means,
    all windows scoring ctx-1 targets), then the mean over batches, then 2.71828 ** loss."""
    batch_losses = []
    for i in range(0, len(window_losses), batch_size):
        part = window_losses[i:i + batch_size]
        batch_losses.append(sum(part) / len(part))
    val_loss = sum(batch_losses) / len(batch_losses)
    return val_loss, 2.71828 ** val_loss


def test_longlora_perplexity_matches_its_aggregation():
    rng = np.random.default_rng(3)
    losses = list(rng.uniform(1.5, 3.5, size=37))
    val_loss, published = longlora_aggregate(losses, batch_size=8)
    assert longlora_perplexity(losses, batch_size=8, published_e=True) == pytest.approx(published, rel=1e-12)
    assert longlora_perplexity(losses, batch_size=8) == pytest.approx(math.exp(val_loss), rel=1e-12)
    # Without batches every window weighs the same.
    assert longlora_perplexity(losses) == pytest.approx(math.exp(np.mean(losses)), rel=1e-12)
    # A whole number of batches: the two agree.
    assert longlora_perplexity(losses[:32], batch_size=8) == pytest.approx(longlora_perplexity(losses[:32]), rel=1e-12)
    assert longlora_perplexity(losses, batch_size=8) != pytest.approx(longlora_perplexity(losses), rel=1e-9)
