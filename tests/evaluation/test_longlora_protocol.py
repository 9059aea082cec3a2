"""`--protocol longlora` against a plain re-implementation of LongLoRA's eval.py loop.

The reference below follows LongLoRA's get_as_batch / evaluate: window starts
range(0, len(data) - seq_length, 256) with the last one dropped, x = data[i:i+seq_length],
loss = model(input_ids=x, labels=x).loss per batch, perplexity = exp(mean of batch losses).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def longlora_reference(model, data: np.ndarray, seq_length: int, batch_size: int, sliding_window: int = 256):
    all_ix = list(range(0, len(data) - seq_length, sliding_window))
    all_ix.pop()
    losses = []
    with torch.no_grad():
        for idx in range(0, len(all_ix), batch_size):
            ix = all_ix[idx:idx + batch_size]
            x = torch.stack([torch.from_numpy(data[i:i + seq_length].astype(np.int64)) for i in ix])
            losses.append(float(model(input_ids=x, labels=x).loss))
    return math.exp(sum(losses) / len(losses)), len(all_ix)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_longlora_protocol_matches_its_loop(tiny_model_dir, tmp_path, batch_size):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scca_eval import evaluate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = np.random.default_rng(0)
    data = rng.integers(0, len(tokenizer), size=2100).astype(np.uint16)
    path = tmp_path / "test.bin"
    data.tofile(path)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected, windows = longlora_reference(model, data, 128, batch_size)

    (record,) = evaluate(str(tiny_model_dir), data=[str(path)], ctx=128, protocol="longlora",
                         batch_size=batch_size, device="cpu")
    assert record["config"]["protocol"] == "longlora"
    assert record["metrics"]["windows"] == windows
    assert record["metrics"]["tokens"] == windows * 127
    assert record["metrics"]["perplexity_batched_as_published"] == pytest.approx(expected, rel=1e-5)
    if windows % batch_size == 0:
        assert record["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_longlora_protocol_differs_from_the_default(tiny_model_dir, sample_data_dir):
    from scca_eval import evaluate

    (stride,) = evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=256, device="cpu")
    (longlora,) = evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=256, device="cpu",
                           protocol="longlora")
    # Overlapping windows: each token is scored up to ctx/256 times, documents are crossed.
    assert longlora["metrics"]["tokens"] > 0
    assert longlora["metrics"]["perplexity"] != pytest.approx(stride["metrics"]["perplexity"], rel=1e-6)


def test_unknown_protocol_is_refused(tiny_model_dir, sample_data_dir):
    from scca_eval import evaluate
    from scca_eval.errors import UserError

    with pytest.raises(UserError, match="unknown protocol"):
        evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=256, protocol="yarn")
