"""`ppl --compile`: compiled decoder layers and loss step give the numbers of the
eager engine and of the independent plain loop, within float noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import reference_perplexity, texts_of


def run_ppl(args, capsys):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", *args])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured


def test_compiled_run_matches_plain_loop_and_eager_run(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected, expected_tokens = reference_perplexity(model, tokenizer, texts_of(sample_data_dir), 128, 128)

    common = ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", "128", "--batch-size", "4",
              "--pattern", "full", "--pattern", "longmixed", "--device", "cpu", "--quiet"]
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    run_ppl([*common, "--compile", "--out", str(tmp_path / "compiled")], capsys)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before, "nothing was compiled"
    run_ppl([*common, "--out", str(tmp_path / "eager")], capsys)

    def records(folder):
        found = {}
        for path in folder.rglob("*.json"):
            record = json.loads(path.read_text())
            found[record["pattern"]["name"] if isinstance(record["pattern"], dict) else record["pattern"]] = record
        return found

    compiled, eager = records(tmp_path / "compiled"), records(tmp_path / "eager")
    assert set(compiled) == set(eager) == {"full", "longmixed"}
    assert compiled["full"]["metrics"]["tokens"] == expected_tokens
    assert math.isclose(compiled["full"]["metrics"]["perplexity"], expected, rel_tol=1e-4)
    for name in compiled:
        assert math.isclose(compiled[name]["metrics"]["perplexity"], eager[name]["metrics"]["perplexity"],
                            rel_tol=1e-5)
    assert compiled["longmixed"]["metrics"]["perplexity"] != compiled["full"]["metrics"]["perplexity"]
    assert all(r["runtime"]["compiled"] for r in compiled.values())
    assert not any(r["runtime"]["compiled"] for r in eager.values())


def test_sweep_compile_runs_compiled(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", "64",
              "--pattern", "full", "--device", "cpu", "--max-tokens", "512", "--compile", "--quiet",
              "--out", str(tmp_path)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    (record,) = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert record["runtime"]["compiled"] is True


@pytest.fixture
def compiled_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from scca_eval.evaluation.engine import compile_for_evaluation

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    compiled = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # a fresh start: layers of the same shapes compiled by an earlier test would pass the guards
    torch._dynamo.reset()
    compile_for_evaluation(compiled)
    return eager, compiled


def _documents(lengths, vocab, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n, dtype=np.int64) for n in lengths]


def test_only_full_batches_of_full_windows_run_compiled(compiled_tiny):
    """A compiled model compiles one shape: batch_size windows of window_length tokens.
    Shorter windows and partial batches run eagerly, so they never trigger a compilation
    (fail_on_recompile would raise), and all of it equals the eager model."""
    from scca_eval.evaluation.engine import score_windows
    from scca_eval.evaluation.windows import plan_windows

    eager, compiled = compiled_tiny
    vocab = eager.config.vocab_size
    # 50- and 30-token documents at ctx 64, and one 64-token window short of a batch of 2
    odd_docs = _documents([50, 30, 64], vocab)
    odd = plan_windows([len(d) for d in odd_docs], 64, 64)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = score_windows(compiled, odd_docs, odd, batch_size=2, window_length=64)
    want = score_windows(eager, odd_docs, odd, batch_size=2, window_length=64)
    assert got.nll_sum.tolist() == want.nll_sum.tolist()  # the same eager code: bit for bit

    # two full windows of 64: the compiled shape, whose first batch runs eagerly (it builds
    # what the attention layers keep), the next compiled
    full_docs = _documents([127], vocab, seed=1)
    full = plan_windows([127], 64, 64)
    assert [w.end - w.start for w in full] == [64, 64]
    with torch.compiler.set_stance("fail_on_recompile"):
        first = score_windows(compiled, full_docs, full, batch_size=2, window_length=64)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="(?i)recompil"):
        score_windows(compiled, full_docs, full, batch_size=2, window_length=64)
    got = score_windows(compiled, full_docs, full, batch_size=2, window_length=64)
    want = score_windows(eager, full_docs, full, batch_size=2, window_length=64)
    assert got.nll_sum == pytest.approx(want.nll_sum, rel=1e-5)
    assert first.nll_sum.tolist() == want.nll_sum.tolist()


def test_compiled_pattern_layers_run_as_whole_graphs(monkeypatch):
    """Under a sparse pattern the compiled layers trace without a graph break (the first
    batch, eager, built the packed layout), share one graph, and are not compiled again from
    call to call (nothing they read changes between calls)."""
    from torch._dynamo.utils import counters

    from helpers import masked_varlen, tiny_llama
    from scca_eval.attention import apply_pattern, packed
    from scca_eval.evaluation.engine import compile_for_evaluation, score_windows
    from scca_eval.evaluation.windows import plan_windows
    from scca_eval.patterns import resolve_pattern

    # the varlen contract as one traceable SDPA call, so that the CPU run compiles as a GPU run does
    monkeypatch.setattr(packed, "segment_attention", masked_varlen)
    model = tiny_llama().eval()
    apply_pattern(model, resolve_pattern("longmixed", chunk_size=8), backend="packed")
    compile_for_evaluation(model)
    documents = _documents([32 * 9], model.config.vocab_size)
    windows = plan_windows([32 * 9], 32, 32)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for _ in range(3):
        score_windows(model, documents, windows, batch_size=2, window_length=32)
        graphs.append(counters["stats"]["unique_graphs"])
    assert sum(counters["graph_break"].values()) == 0
    assert graphs == [1, 1, 1]  # the layers share one graph (they read one spec object)


@pytest.mark.parametrize("backend", ["strided", "chunked"])
@pytest.mark.parametrize("pattern", ["longmixed", "scca_flow"])
def test_compiled_layers_on_the_view_and_chunk_backends_run_as_whole_graphs(pattern, backend):
    """strided and chunked read the pattern's chunk length and head groups, whose arithmetic
    runs on Fractions (the chunk a share of the window by default; scca_flow's groups a share
    of the heads each): read inside a compiled layer, that broke its graph at every call. They
    come from a cache now, and the layers trace whole, into one shared graph."""
    from torch._dynamo.utils import counters

    from helpers import tiny_llama
    from scca_eval.attention import apply_pattern
    from scca_eval.evaluation.engine import compile_for_evaluation, score_windows
    from scca_eval.evaluation.windows import plan_windows
    from scca_eval.patterns import resolve_pattern

    model = tiny_llama().eval()
    spec = resolve_pattern(pattern)  # no chunk size: the default share of the window
    assert spec.chunk_size is None
    apply_pattern(model, spec, backend=backend)
    compile_for_evaluation(model)
    documents = _documents([64 * 3], model.config.vocab_size)
    windows = plan_windows([64 * 3], 64, 64)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        score_windows(model, documents, windows, batch_size=1, window_length=64)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", ["strided", "chunked"])
def test_a_pattern_applied_after_another_traces_whole_too(backend):
    """A sweep evaluates one compiled model under one pattern after another. The first batch
    of every (pattern, shape) must run eagerly, so that the new pattern's layout is built
    before its layers are traced: a layer traced without it keeps a graph break for good."""
    from torch._dynamo.utils import counters

    from helpers import tiny_llama
    from scca_eval.attention import apply_pattern
    from scca_eval.evaluation.engine import compile_for_evaluation, score_windows
    from scca_eval.evaluation.windows import plan_windows
    from scca_eval.patterns import preset, resolve_pattern

    model = tiny_llama().eval()
    documents = _documents([64 * 3], model.config.vocab_size)
    windows = plan_windows([64 * 3], 64, 64)
    torch._dynamo.reset()
    compile_for_evaluation(model)
    for spec in (resolve_pattern("full"), preset("longmixed", chunk_size=16)):
        apply_pattern(model, spec, backend=backend)
        counters.clear()
        for _ in range(2):
            score_windows(model, documents, windows, batch_size=1, window_length=64)
        assert sum(counters["graph_break"].values()) == 0, (spec.name, dict(counters["graph_break"]))
        assert counters["stats"]["unique_graphs"] == 1, spec.name


def test_automatic_batch_is_no_larger_than_the_full_windows():
    """So that a small task still has full batches for a compiled model to run compiled."""
    from scca_eval.evaluation.engine import auto_batch_size
    from scca_eval.evaluation.windows import plan_windows

    cpu = torch.device("cpu")
    assert auto_batch_size(64, cpu) == 64  # the token budget alone (8192 // 64), capped at 64
    three_full = plan_windows([127 + 63 + 20], 64, 64, "short")  # 3 windows of 64 and a last, shorter one
    assert [w.end - w.start for w in three_full] == [64, 64, 64, 21]
    assert auto_batch_size(64, cpu, three_full) == 3
    only_short = plan_windows([20, 30], 64, 64)
    assert auto_batch_size(64, cpu, only_short) == 2
    assert auto_batch_size(4096, cpu, three_full) == 2  # the budget is smaller still
