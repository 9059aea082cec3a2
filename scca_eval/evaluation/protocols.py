"""The evaluation protocols as objects: which options they take, their windows, what their
records say about them.

A protocol is named once (``--protocol``, a sweep file's ``protocol``, ``EvalSettings``)
and looked up here (:func:`protocol_named`); from then on the code asks the object, never
the name:

* ``check(settings)``: refuse options the protocol does not take (one line each);
* ``documents`` / ``plan``: the documents as the model reads them and the windows over
  them (``windows.py`` plans the windows themselves);
* ``cell_fields(settings, ctx)``: the stride, protocol, last window and bootstrap seed
  a cell's record stores. The record (``cells.py``) and the identity a sweep predicts
  for it (``cells.predicted_key``) both read them from here, so they cannot drift apart;
* ``scored_tokens``: how many targets a cell scores, before it runs (the cost line).

``stride`` and ``lm-eval`` score each document on its own and keep per-document progress
(``evaluation/cells.py:evaluate_cell``); ``longlora`` joins the documents into one stream
(``joins_documents``, ``cells.py:evaluate_longlora_cell``). docs/protocols.md describes them.
Nothing heavy is imported here: the CLI checks settings with it before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..choices import LAST_WINDOWS, PROTOCOLS
from ..errors import UserError
from .windows import Window, limit_scored_tokens, plan_lm_eval_windows, plan_longlora_windows, plan_windows

if TYPE_CHECKING:
    from .settings import EvalSettings

LONGLORA_STEP = 256  # LongLoRA's eval.py: a window starts every 256 tokens


@dataclass(frozen=True)
class CellFields:
    """What a cell's record stores about its protocol: ``stride`` (the record's), ``protocol``
    (its name), ``last_window`` (None where documents have no last window) and
    ``bootstrap_seed`` (None where there is no bootstrap over documents)."""

    stride: int
    protocol: str
    last_window: str | None
    bootstrap_seed: int | None


@dataclass
class CellPlan:
    """A cell's work: the documents as the model reads them, the length of each that is
    scored (``--max-tokens`` takes prefixes), the windows, and what the protocol adds to the
    record's config (lm-eval: its prefix token)."""

    documents: list
    lengths: list[int]
    windows: list[Window]
    config: dict


class Protocol:
    """A per-document protocol: every document on its own, progress kept per document."""

    name: str
    joins_documents = False  # True: the documents are read as one stream (no per-document progress)

    def check(self, settings: EvalSettings) -> None:
        """Refuse the options this protocol does not take (and a last window of no kind)."""
        if settings.last_window not in LAST_WINDOWS:
            raise UserError(f"unknown --last-window {settings.last_window!r}; choose one of {', '.join(LAST_WINDOWS)}")

    def bounded_stride(self, settings: EvalSettings) -> int | None:
        """The stride to check against every ctx (None: the protocol's stride is not bounded by ctx)."""
        return settings.stride

    def cell_fields(self, settings: EvalSettings, ctx: int) -> CellFields:
        return CellFields(settings.stride or ctx, self.name, settings.last_window, settings.seed)

    def window_span(self, ctx: int) -> int:
        """Tokens of a window, its last target included."""
        return ctx

    def documents(self, tokenized, tokenizer) -> tuple[list, dict]:
        """The documents as the model reads them, and what the protocol put in front of them."""
        return list(tokenized.docs), {}

    def windows(self, lengths: Sequence[int], ctx: int, settings: EvalSettings) -> list[Window]:
        raise NotImplementedError

    def plan(self, tokenized, tokenizer, ctx: int, settings: EvalSettings) -> CellPlan:
        documents, config = self.documents(tokenized, tokenizer)
        lengths = [len(d.ids) for d in documents]
        if settings.max_tokens is not None:
            lengths = limit_scored_tokens(lengths, self.window_span(ctx), settings.max_tokens)
        return CellPlan(documents, lengths, self.windows(lengths, ctx, settings), config)

    def scored_tokens(self, tokenized, ctx: int, max_tokens: int | None) -> int:
        """How many targets a cell scores (before it runs, for the cost of a whole run)."""
        extra = self.window_span(ctx) - ctx  # tokens the protocol puts in front of each document
        lengths = [len(d.ids) + extra for d in tokenized.docs]
        if max_tokens is not None:
            lengths = limit_scored_tokens(lengths, self.window_span(ctx), max_tokens)
        return sum(n - 1 for n in lengths if n >= 2)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<protocol {self.name}>"


class StrideProtocol(Protocol):
    """The default: per document, windows of ctx advancing by ``--stride``, every token but
    a document's first scored once; ``--last-window`` says how a document ends."""

    name = "stride"

    def windows(self, lengths, ctx, settings):
        return plan_windows(lengths, ctx, settings.stride or ctx, settings.last_window)


class LmEvalProtocol(Protocol):
    """lm-evaluation-harness's ``loglikelihood_rolling``: its prefix token in front of every
    document (``lm_eval_protocol.py``), ctx = its max_length, windows advancing by ctx."""

    name = "lm-eval"

    def check(self, settings):
        super().check(settings)
        if settings.stride is not None:
            raise UserError("--stride does not apply to --protocol lm-eval (its windows advance by max_length "
                            "= ctx); leave --stride out")
        if settings.add_bos:
            raise UserError("--bos does not apply to --protocol lm-eval: lm-eval puts its own prefix token in "
                            "front of every document; leave --bos out")
        if settings.last_window != "full":
            raise UserError(f"--last-window {settings.last_window} does not apply to --protocol lm-eval (its last "
                            "window is always right-aligned); leave it out")

    def window_span(self, ctx):
        return ctx + 1  # the prefix token comes on top of ctx predictions

    def documents(self, tokenized, tokenizer):
        from .lm_eval_protocol import lm_eval_documents

        documents, added = lm_eval_documents(tokenized, tokenizer)
        return documents, {"lm_eval": added}

    def windows(self, lengths, ctx, settings):
        return plan_lm_eval_windows(lengths, ctx)


class LongLoRAProtocol(Protocol):
    """LongLoRA's ``eval.py``: the documents joined into one stream, ctx-token windows every
    ``--stride`` tokens (default 256), every target of every window scored,
    perplexity = exp(mean of the window losses)."""

    name = "longlora"
    joins_documents = True

    def check(self, settings):
        super().check(settings)
        stride = settings.stride
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise UserError(f"--stride (the LongLoRA window step) must be a whole number of at least 1; got {stride!r}")
        if settings.last_window != "full":
            raise UserError(f"--last-window {settings.last_window} does not apply to --protocol longlora (it scores "
                            "every target of every window of one stream); leave it out")

    def bounded_stride(self, settings):
        return None  # a step between window starts, which may exceed ctx

    def cell_fields(self, settings, ctx):
        return CellFields(settings.stride or LONGLORA_STEP, self.name, None, None)

    def stream_windows(self, stream_length: int, ctx: int, settings: EvalSettings) -> list[Window]:
        """Its windows over the stream; with --max-tokens the first ones, enough for that many targets."""
        windows = plan_longlora_windows(stream_length, ctx, self.cell_fields(settings, ctx).stride)
        if settings.max_tokens is not None:
            windows = windows[: max(1, -(-settings.max_tokens // (ctx - 1)))]
        return windows

    def scored_tokens(self, tokenized, ctx, max_tokens):
        total = sum(len(d.ids) for d in tokenized.docs)
        return min(total, max_tokens) if max_tokens is not None else total


_PROTOCOLS = {protocol.name: protocol for protocol in (StrideProtocol(), LongLoRAProtocol(), LmEvalProtocol())}
assert tuple(_PROTOCOLS) == PROTOCOLS  # choices.PROTOCOLS lists them for --help without importing this module


def protocol_named(name) -> Protocol:
    """The protocol of a name (``--protocol``); a Protocol is returned as it is."""
    if isinstance(name, Protocol):
        return name
    if name not in _PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return _PROTOCOLS[name]

