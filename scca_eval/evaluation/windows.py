"""The evaluation protocols: which tokens go through the model together, and which are scored.

A :class:`Window` feeds ``ids[start:end]`` of one document to the model and scores the
targets ``score_from .. end-1``; the target at index ``t`` is predicted from
``ids[start:t]``, the tokens before it inside the window. A window of ``n`` tokens can
therefore score at most ``n - 1`` targets: its first token has nothing before it.

Three protocols:

* :func:`plan_windows` — the default, per document: every token except a document's
  first is scored exactly once, with as much context as its window gives, and windows
  never cross documents. The last window of a document is right-aligned to its end and a
  full ``ctx`` long (``last_window="full"``); ``"short"`` keeps it to the tokens left, as
  in the Hugging Face perplexity guide and the transformers/YaRN recipes.
* :func:`plan_lm_eval_windows` — lm-evaluation-harness's ``loglikelihood_rolling``
  (``scca_eval.evaluation.lm_eval_protocol`` prepares its documents).
* :func:`plan_longlora_windows` — exactly what LongLoRA's ``eval.py`` computes on its
  flat token streams, to reproduce published numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..choices import LAST_WINDOWS
from ..errors import UserError


@dataclass(frozen=True)
class Window:
    """Feed ``ids[start:end]`` of document ``doc``; score targets ``score_from .. end-1``."""

    doc: int
    start: int
    end: int
    score_from: int
    # False: the model is fed ids[start:end-1] only. The last token is a target and never
    # context, so its hidden state is unused; lm-eval does not feed it, and under a pattern
    # the length the layers see decides the chunk size.
    feeds_last: bool = True

    @property
    def scored(self) -> int:
        return self.end - self.score_from

    @property
    def fed(self) -> int:
        """Tokens the model is fed for this window."""
        return self.end - self.start - (0 if self.feeds_last else 1)


def _check_ctx(ctx: int, stride: int | None = None) -> None:
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise UserError(f"ctx must be a whole number of at least 2 tokens (got {ctx!r})")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= ctx):
        raise UserError(f"stride must be a whole number between 1 and ctx ({ctx}); got {stride!r}")


def plan_windows(lengths: Sequence[int], ctx: int, stride: int, last_window: str = "full") -> list[Window]:
    """The default protocol's windows over documents of the given lengths (in tokens).

    Per document of ``L`` tokens: windows start at ``0, step, 2*step, ...`` with
    ``step = min(stride, ctx - 1)``, each ``min(ctx, L - start)`` tokens long, and the
    last one is the first that reaches the end of the document. With
    ``last_window="full"`` (the default) that last window is moved back to start at
    ``L - ctx`` when the document has at least ``ctx`` tokens, so it is a full ``ctx``
    long and ends at the document's end: it re-reads already scored tokens as context
    and scores the same new targets, each with more context. ``"short"`` leaves it
    short (fewer tokens of context for its targets). Each window scores the
    targets that no earlier window scored (``score_from`` = the previous window's end; 1
    for the first window, so a document's first token is never scored). So every target
    ``1 .. L-1`` is scored exactly once, with ``t - start`` tokens of context, and windows
    never cross documents. Documents of fewer than two tokens get no window.

    Why ``min(stride, ctx - 1)``: a window's first token has no context inside it, so
    consecutive windows must overlap by at least one token for every token to be scored.
    ``stride = ctx`` (the default, "disjoint" windows) therefore means windows whose
    scored targets are disjoint: each window of ``ctx`` tokens scores its last ``ctx - 1``
    tokens, and ``stride = ctx - 1`` gives the same windows. For ``stride < ctx`` this is
    exactly the Hugging Face guide's loop (``begin`` in ``range(0, L, stride)``,
    ``trg_len = end - prev_end``), and each target outside a document's first window gets
    at least ``ctx - stride`` tokens of context.
    """
    _check_ctx(ctx, stride)
    if last_window not in LAST_WINDOWS:
        raise UserError(f"unknown last window {last_window!r}; choose one of {', '.join(LAST_WINDOWS)}")
    step = min(stride, ctx - 1)
    windows: list[Window] = []
    for doc, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"document {doc} has a negative length ({length})")
        if length < 2:
            continue
        scored_until = 1  # targets before this index are already scored (target 0 never is)
        start = 0
        while True:
            end = min(start + ctx, length)
            if end == length and last_window == "full":
                start = max(0, min(start, length - ctx))
            windows.append(Window(doc, start, end, scored_until))
            if end == length:
                break
            scored_until = end
            start += step
    return windows


def plan_lm_eval_windows(lengths: Sequence[int], max_length: int) -> list[Window]:
    """lm-evaluation-harness's rolling windows (``loglikelihood_rolling``) over documents
    whose ids start with lm-eval's prefix token (``lm_eval_protocol.lm_eval_documents``).

    lm-eval (``utils.get_rolling_token_windows`` with ``context_len=1``, then
    ``make_disjoint_window``) predicts every token of a document of ``n`` tokens: the first
    window feeds the prefix token and the first ``min(n, max_length) - 1`` tokens and
    predicts ``min(n, max_length)`` tokens; each later window predicts the next
    ``max_length`` tokens (fewer in the last) and feeds the ``max_length`` tokens before
    its last target, so the last window is right-aligned to the document's end. On the
    ids with the prefix token in front (``L = n + 1`` of them) these are exactly the
    default protocol's windows of ``max_length + 1`` tokens with a full last window,
    except that a window's last token (a target only) is not fed: the model sees
    ``max_length`` tokens at most, as in lm-eval.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise UserError(f"ctx (lm-eval's max_length) must be a whole number of at least 1 (got {max_length!r})")
    return [Window(w.doc, w.start, w.end, w.score_from, feeds_last=False)
            for w in plan_windows(lengths, max_length + 1, max_length + 1, "full")]


def limit_scored_tokens(lengths: Sequence[int], ctx: int, max_tokens: int) -> list[int]:
    """Per-document prefix lengths that score ``max_tokens`` targets in all (``--max-tokens``).

    The rule: a prefix of ``p`` tokens scores exactly ``p - 1`` targets under
    :func:`plan_windows`, whatever the stride. The documents share the budget through
    one common prefix length ``P``: each document contributes ``min(L, P)`` tokens, with
    ``P`` the smallest length of at least ``ctx`` for which the documents together reach
    the budget (so every document contributes at least one whole window of ``ctx`` tokens
    when it is that long, and short documents leave their share to the others).
    Documents are taken in order until the budget is spent; the last one taken is cut to
    meet it exactly — unless that cut would be shorter than one window (and other
    documents were taken), then it is left out — and those after it get 0 (not
    evaluated). Returns one prefix length per document, in the order given; documents of
    fewer than two tokens keep their length (they score nothing). The total scored is
    ``min(max_tokens, sum(L - 1))``, less a left-out sliver of fewer than ``ctx`` tokens.
    """
    _check_ctx(ctx)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"--max-tokens must be a whole number of at least 1 (got {max_tokens!r})")
    scorable = [n for n in lengths if n >= 2]

    def scored_with(prefix: int) -> int:
        return sum(min(n, prefix) - 1 for n in scorable)

    longest = max(scorable, default=2)
    if scored_with(max(ctx, longest)) <= max_tokens:
        prefix = max(ctx, longest)  # the budget covers everything
    else:  # smallest prefix >= ctx that reaches the budget (scored_with is monotone)
        low, high = ctx, max(ctx, longest)
        while low < high:
            middle = (low + high) // 2
            if scored_with(middle) >= max_tokens:
                high = middle
            else:
                low = middle + 1
        prefix = low
    remaining = max_tokens
    out = []
    for length in lengths:
        if length < 2:
            out.append(max(length, 0))
            continue
        take = min(length, prefix, remaining + 1) if remaining > 0 else 0
        if 0 < take < min(length, prefix) and take < min(length, ctx) and remaining < max_tokens:
            # A sliver of a document (shorter than one window) would add a handful of
            # context-starved tokens with outsized loss and distort the bootstrap over
            # documents: leave it out and score slightly fewer than max_tokens.
            take = 0
        out.append(take)
        remaining -= max(take - 1, 0)
    return out


def plan_longlora_windows(stream_length: int, ctx: int, step: int = 256) -> list[Window]:
    """LongLoRA's evaluation windows over a flat token stream (its ``eval.py``).

    LongLoRA's ``get_as_batch`` takes window starts ``range(0, len(data) - ctx, 256)``
    and drops the last of them (``all_ix.pop()``). For a start ``i`` it builds
    ``x = data[i : i + ctx]`` and calls the model with ``input_ids=x, labels=x``; the
    model shifts the labels internally, so the loss of a window is the mean NLL of the
    ``ctx - 1`` targets ``data[i+1 .. i+ctx-1]``, each predicted from all the tokens
    before it in the window (its ``y = data[i+1 : i+1+ctx]`` is only used for accuracy).
    Windows overlap (every token is scored up to ``ctx / 256`` times), start anywhere in
    the stream (documents are crossed freely), and the final stretch is dropped. The
    windows here are exactly those: ``Window(0, i, i + ctx, i + 1)``; aggregate their
    mean losses with :func:`longlora_perplexity`.
    """
    _check_ctx(ctx)
    if step < 1:
        raise UserError(f"the LongLoRA window step must be at least 1 (got {step})")
    starts = list(range(0, stream_length - ctx, step))
    if len(starts) < 2:
        raise UserError(f"the token stream has {stream_length} tokens; LongLoRA's protocol at ctx {ctx} "
                        f"needs at least {ctx + step + 1} (it drops the last window); use a smaller ctx")
    starts.pop()
    return [Window(0, i, i + ctx, i + 1) for i in starts]


def longlora_perplexity(window_losses: Sequence[float], *, batch_size: int | None = None,
                        published_e: bool = False) -> float:
    """LongLoRA's perplexity from per-window mean losses: ``exp(mean of the window losses)``.

    Every window scores the same ``ctx - 1`` targets, so LongLoRA's batch loss is the
    mean of its windows' losses, and its ``val_loss`` is the mean over batches. With
    ``batch_size`` given, this reproduces that two-level mean exactly (the last, partial
    batch then weighs as much as a full one); without it, all windows weigh the same
    (the two agree whenever the number of windows is a multiple of the batch size).
    ``eval.py`` reports ``2.71828 ** val_loss``; ``published_e=True`` uses that constant
    instead of ``e`` (a relative difference of about ``6.7e-7 * loss``).
    """
    losses = [float(x) for x in window_losses]
    if not losses:
        raise ValueError("no window losses to aggregate")
    if batch_size is None:
        loss = math.fsum(losses) / len(losses)
    else:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        batches = [losses[i:i + batch_size] for i in range(0, len(losses), batch_size)]
        loss = math.fsum(math.fsum(b) / len(b) for b in batches) / len(batches)
    return 2.71828 ** loss if published_e else math.exp(loss)
