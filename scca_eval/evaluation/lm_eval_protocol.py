"""lm-evaluation-harness's rolling log-likelihood as a protocol (``--protocol lm-eval``).

lm-eval's ``HFLM.loglikelihood_rolling`` scores every token of a document, the first one
conditioned on a prefix token, in windows of ``max_length`` predictions whose last one is
right-aligned to the document's end (:func:`scca_eval.evaluation.windows.plan_lm_eval_windows`).
Here ``--ctx L`` is its ``max_length=L``. What lm-eval tokenizes is reproduced as well:

* the prefix token is the one ``HFLM.prefix_token_id`` picks: the tokenizer's BOS token,
  else its EOS token;
* a document is encoded as ``tokenizer.encode(text)`` does by default, that is with the
  special tokens the tokenizer adds in front (LLaMA-2's BOS; none for GPT-2-style
  tokenizers such as SmolLM2's), except when the text itself starts with the prefix
  token's text (lm-eval then encodes without special tokens).

The token ids come from the project's token cache (encoded without special tokens); this
module puts the prefix and leading special tokens in front of them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..data import TokenizedTask
from ..errors import UserError

PROTOCOL = "lm-eval"


def prefix_token_id(tokenizer) -> int:
    """lm-eval's choice (``HFLM.prefix_token_id`` without a custom one): BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError("the tokenizer has neither a BOS nor an EOS token, so lm-eval's protocol has no prefix "
                    "token to score a document's first token with; use --protocol stride")


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens ``tokenizer.encode(text)`` puts before a text (lm-eval's default
    encoding), found by encoding a probe text with and without special tokens."""
    probe = "The probe text."
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    cut = len(special) - len(plain)
    if cut < 0 or special[cut:] != plain:
        raise UserError(f"{type(tokenizer).__name__} adds special tokens after the text; lm-eval's protocol "
                        "supports tokenizers that add them in front only; use --protocol stride")
    return [int(t) for t in special[:cut]]


def lm_eval_documents(tokenized: TokenizedTask, tokenizer) -> tuple[list, dict]:
    """The task's documents with lm-eval's prefix token (and the leading special tokens of
    its default encoding) in front, and what was put there, for the record's config.

    The byte and word counts stay those of the document's text (the added tokens cover no
    text), so bits per byte and word perplexity are lm-eval's."""
    if tokenized.flat:
        raise UserError("a pre-tokenized token stream has no document text to encode as lm-eval does; "
                        "use --protocol stride or longlora for .bin files")
    if tokenized.add_bos:
        raise UserError("--bos does not apply to --protocol lm-eval: lm-eval puts its own prefix token "
                        "in front of every document; leave --bos out")
    prefix = prefix_token_id(tokenizer)
    lead = leading_special_ids(tokenizer)
    docs = []
    for doc in tokenized.docs:
        # lm-eval encodes a text that starts with the prefix token's text without special tokens
        added = [prefix] if len(doc.ids) and int(doc.ids[0]) == prefix else [prefix, *lead]
        front = np.asarray(added, dtype=doc.ids.dtype)
        zeros = np.zeros(len(added), dtype=np.int64)
        docs.append(replace(
            doc, ids=np.concatenate([front, doc.ids]),
            token_bytes=None if doc.token_bytes is None else np.concatenate([zeros, doc.token_bytes]),
            token_runs=None if doc.token_runs is None else np.concatenate([zeros, doc.token_runs]),
        ))
    return docs, {"prefix_token_id": prefix, "leading_special_ids": lead}
