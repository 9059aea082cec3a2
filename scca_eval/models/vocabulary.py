"""Tokenizer care: embedding rows that match the tokenizer, and what the record says about it.

Some LLaMA-2 fine-tunes (LongLoRA among them) add a ``[PAD]`` token, so their tokenizer
has 32001 entries while the base checkpoint has 32000 embedding rows. A token id past
the last row would crash the embedding lookup, so the embedding (and the output layer)
grow to the tokenizer's size, and only then. The new rows are the mean of the old rows,
as LongLoRA's ``smart_tokenizer_and_embedding_resize`` makes them: deterministic, and
the same values LongLoRA's own merge script produces.
"""

from __future__ import annotations

import torch

from ..data.tokens import tokenizer_fingerprint


def grow_embeddings(model, rows: int) -> dict | None:
    """Give the model at least ``rows`` embedding rows; returns what changed (or None)."""
    current = int(model.get_input_embeddings().weight.shape[0])
    if rows <= current:
        return None
    # mean_resizing=False: transformers would otherwise draw the new rows at random.
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None:
                continue
            weight = layer.weight
            weight[current:] = weight[:current].mean(dim=0, keepdim=True)
    return {"from": current, "to": rows, "new_rows": "mean of the existing rows"}


def tokenizer_summary(tokenizer, name: str) -> dict:
    """Name, size, BOS/EOS handling and the fingerprint of a tokenizer (``data.tokens.tokenizer_fingerprint``
    without a BOS token added: the tokenizer alone)."""
    sample = tokenizer("a").input_ids  # default add_special_tokens=True, as the evaluation uses it
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and len(sample) > 0 and sample[0] == bos
    adds_eos = eos is not None and len(sample) > 0 and sample[-1] == eos
    return {
        "name": name,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "adds_bos": adds_bos,
        "adds_eos": adds_eos,
        "fingerprint": tokenizer_fingerprint(tokenizer),
    }

