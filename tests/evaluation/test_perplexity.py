"""scca-eval's perplexity against an independent, plain Hugging Face loop.

The reference is the sliding-window recipe of the transformers perplexity guide:
one window at a time, the model's own loss with labels = -100 on context tokens.
One deliberate difference, the protocol's definition: windows advance by
min(stride, ctx - 1), so that with disjoint windows (stride = ctx) no token at a
window's start goes unscored. With last_window="full" (the default protocol) a
document's last window is moved back to end at the document's end with ctx tokens,
its scored targets unchanged. It shares no code with scca_eval beyond the
tokenizer call.
"""

from __future__ import annotations

import pytest
import torch
from helpers import reference_perplexity, texts_of


@pytest.mark.parametrize("ctx,stride,batch_size,last_window", [
    (256, 256, 1, "full"), (256, 256, 3, "full"), (256, 96, 3, "full"), (200, 200, 1, "full"),
    (256, 256, 3, "short"), (256, 96, 1, "short"), (200, 200, 3, "short"),
])
def test_tiny_model_matches_plain_loop(tiny_model_dir, sample_data_dir, ctx, stride, batch_size, last_window):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scca_eval import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected, expected_tokens = reference_perplexity(model, tokenizer, texts_of(sample_data_dir), ctx, stride,
                                                     last_window)

    (record,) = evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=ctx, stride=stride,
                         batch_size=batch_size, device="cpu", last_window=last_window)
    assert record["config"]["last_window"] == last_window
    assert record["metrics"]["tokens"] == expected_tokens
    assert record["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_default_model_matches_plain_loop(sample_data_dir):
    from scca_eval import evaluate, load_model

    model, tokenizer = load_model("default", device="cpu")
    texts = [t[:2500] for t in texts_of(sample_data_dir)]
    folder = sample_data_dir.parent / "default-slice"
    folder.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    for ctx, stride, batch in [(256, 256, 2), (256, 128, 1), (300, 100, 3)]:
        expected, tokens = reference_perplexity(model, tokenizer, texts, ctx, stride)
        (record,) = evaluate("default", data=[str(folder)], ctx=ctx, stride=stride,
                             batch_size=batch, loaded=(model, tokenizer))
        assert record["metrics"]["tokens"] == tokens
        assert record["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_a_perplexity_that_is_not_finite_is_recorded_and_said(tiny_model_dir, sample_data_dir, tmp_path):
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scca_eval import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")  # one NaN weight: every loss is NaN
    said = []
    (record,) = evaluate(str(tiny_model_dir), loaded=(model, tokenizer), data=[str(sample_data_dir)], ctx=64,
                         max_tokens=256, device="cpu", out=str(tmp_path), notify=said.append)
    assert math.isnan(record["metrics"]["perplexity"])  # a true result of this model: kept
    assert list(tmp_path.glob("*.json"))
    warnings = [line for line in said if "not finite" in line]
    assert len(warnings) == 1 and "perplexity is nan at ctx 64" in warnings[0]
