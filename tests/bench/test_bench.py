"""The benchmarks on CPU at tiny sizes: they run, report consistent figures, and
measure the same work on both sides of each comparison."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from scca_eval.bench import attention_bench, markdown_attention, markdown_model, model_bench, pattern_from_label
from scca_eval.cli.bench import bench
from helpers import dense_mask, spec_named

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def test_attention_bench_rows_and_shares():
    result = attention_bench(ns=(128,), heads=4, head_dim=16, patterns=["s2", "sda-r4"], dtype=torch.float32,
                             backends=("chunked", "strided", "strided-serial"), repeats=1, warmup=0, log=None)
    assert set(result["sdpa_causal_ms"]) == {128}
    rows = result["rows"]
    assert len(rows) == 6 and all(row["error"] is None for row in rows)
    for row in rows:
        spec = spec_named("sda4" if row["pattern"] == "sda-r4" else row["pattern"])
        kept = int(dense_mask(spec, 128, 4).sum())
        assert row["flop_share"] == pytest.approx(kept / (4 * 128 * 129 / 2))
        assert row["ratio"] == pytest.approx(row["ms"] / (row["flop_share"] * result["sdpa_causal_ms"][128]))
        assert row["rel_error"] < 1e-5  # fp32 against the fp32 chunked reference
    table = markdown_attention(result)
    assert "| s2 |" in table and "| sda-r4 |" in table and "chunked" in table


def test_attention_bench_forward_and_backward_rows():
    result = attention_bench(ns=(96,), heads=4, kv_heads=2, head_dim=8, patterns=["scca_fixed"], dtype=torch.float32,
                             backends=("chunked", "packed"), modes=("fwd", "fwd+bwd"), repeats=1, warmup=0, log=None)
    rows = {(row["backend"], row["mode"]): row for row in result["rows"]}
    assert set(rows) == {(b, m) for b in ("chunked", "packed") for m in ("fwd", "fwd+bwd")}
    backward_ms = result["sdpa_causal_fwd_bwd_ms"][96]
    for (backend, mode), row in rows.items():
        assert row["error"] is None and row["rel_error"] < 1e-5, row
        base = result["sdpa_causal_ms"][96] if mode == "fwd" else backward_ms
        assert row["ideal_ms"] == pytest.approx(row["flop_share"] * base)
    assert result["pattern_keys"] == {"scca_fixed": "1/2 local + 1/2 cross(1) @ G=N*1/4"}
    table = markdown_attention(result)
    assert "N = 96, forward:" in table and "N = 96, forward and backward:" in table


def test_attention_bench_reports_a_failing_backend_without_stopping():
    result = attention_bench(ns=(64,), heads=2, head_dim=8, patterns=["s2"], dtype=torch.float32,
                             backends=("chunked", "broken"), flex_variants={"broken": {"block_size": 0}},
                             repeats=1, warmup=0, check=False, log=None)
    by_backend = {row["backend"]: row for row in result["rows"]}
    assert by_backend["chunked"]["error"] is None
    assert by_backend["broken"]["ms"] is None and by_backend["broken"]["error"]


def test_model_bench_engine_and_plain_do_the_same_work(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    result = model_bench(str(config), ctxs=(48,), patterns=("full", "s2"), batch_size=2,
                         backends=("chunked", "strided"), tokens_per_run=150, repeats=1, device="cpu", log=None)
    strided = {row["path"]: row for row in result["rows"] if row["backend"] == "strided"}
    rows = {(row["pattern"], row["path"]): row for row in result["rows"] if row["backend"] != "strided"}
    assert set(rows) == {("full", "engine"), ("full", "plain"), ("s2", "engine"), ("s2", "plain")}
    # the strided layout inside the model computes what the chunked one does
    for path in ("engine", "plain"):
        assert strided[path]["mean_nll"] == pytest.approx(rows["s2", path]["mean_nll"], rel=1e-6)
    for pattern in ("full", "s2"):
        engine, plain = rows[pattern, "engine"], rows[pattern, "plain"]
        assert engine["error"] is None and plain["error"] is None
        # 150 // 48 = 3 windows of 48 tokens, each scoring its last 47
        assert engine["windows"] == 3 and engine["forward_tokens"] == 3 * 48
        assert engine["scored_tokens"] == plain["scored_tokens"] == 3 * 47
        assert engine["mean_nll"] == pytest.approx(plain["mean_nll"], rel=1e-5)
    # a pattern changes the computation
    assert rows["s2", "engine"]["mean_nll"] != pytest.approx(rows["full", "engine"]["mean_nll"], rel=1e-7)

    # FLOPs: 2 x matmul weights x tokens (+ attention), counted here from the shape alone
    h, i, layers, vocab = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"], TINY["vocab_size"]
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    body = layers * (h * h + 2 * h * kv + h * h + 3 * h * i)
    assert result["matmul_params"] == body + vocab * h
    full = rows["full", "plain"]
    attention = 4 * h * layers * 3 * 48 * 49 / 2  # causal pairs x head_dim x heads = pairs x hidden
    expected = 2 * (body + vocab * h) * 3 * 48 + attention
    assert full["tflops"] * full["seconds"] * 1e12 == pytest.approx(expected, rel=1e-9)
    assert "| 48 | s2 | chunked | engine |" in markdown_model(result)
    assert {row["kernel"] for row in result["rows"] if row["pattern"] == "s2"} == {"chunked", "strided"}  # as asked


def test_auto_kernel_asks_auto_with_the_case_and_no_memory(monkeypatch):
    """What bench model, bench train and ctx_scaling.py report as auto's kernel: auto's own
    choice for the model's head shape at that length, forward alone or with a backward to come,
    asked with stand-ins of one element."""
    from types import SimpleNamespace

    from scca_eval.attention import auto
    from scca_eval.bench.model import auto_kernel, backend_label

    asked = []

    def fake_choose(spec, q, k, v):
        asked.append((tuple(q.shape), tuple(k.shape), auto.mode_of(q, k, v),
                      q.untyped_storage().nbytes() + k.untyped_storage().nbytes()))
        return "flex"

    monkeypatch.setattr(auto, "choose", fake_choose)
    config = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    s2, full = pattern_from_label("s2"), pattern_from_label("full")
    cpu = torch.device("cpu")
    assert auto_kernel(config, s2, "auto", 16384, cpu, torch.bfloat16, backward=False) == "flex"
    assert auto_kernel(config, s2, "auto", 32768, cpu, torch.bfloat16, backward=True) == "flex"
    assert asked == [((1, 9, 16384, 64), (1, 3, 16384, 64), "fwd", 4),
                     ((1, 9, 32768, 64), (1, 3, 32768, 64), "fwd+bwd", 4)]
    with torch.no_grad():  # asked for a backward, it answers for one even where no grad is on
        auto_kernel(config, s2, "auto", 8, cpu, torch.bfloat16, backward=True)
    assert asked[-1][2] == "fwd+bwd"
    # a backend asked for by name, or full attention, is not auto's to choose
    assert auto_kernel(config, s2, "strided", 8, cpu, torch.bfloat16, backward=True) == "strided"
    assert auto_kernel(config, full, "auto", 8, cpu, torch.bfloat16, backward=False) == "sdpa"
    assert len(asked) == 3
    assert backend_label("auto", "flex") == "auto (flex)" and backend_label("auto", "sdpa") == "auto"
    assert backend_label("strided", "strided") == "strided"


def test_cli_model_compiled_engine_against_eager_plain_loop(tmp_path):
    config, out = tmp_path / "tiny.json", tmp_path / "model.json"
    config.write_text(json.dumps(TINY))
    result = CliRunner().invoke(bench, ["model", "--shape", str(config), "--ctx", "48", "--pattern", "full",
                                        "--tokens-per-run", "150", "--repeats", "2", "--compile",
                                        "--device", "cpu", "--json", str(out), "--markdown", str(tmp_path / "m.md")])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["compiled"] is True
    rows = {row["path"]: row for row in data["rows"]}
    assert rows["engine"]["error"] is None and rows["plain"]["error"] is None
    assert len(rows["engine"]["times_s"]) == len(rows["plain"]["times_s"]) == 2
    assert rows["engine"]["mean_nll"] == pytest.approx(rows["plain"]["mean_nll"], rel=1e-5)
    table = (tmp_path / "m.md").read_text()
    assert "engine compiled" in table
    line = next(row for row in table.splitlines() if "| engine |" in row)
    assert re.search(r"\| \d+\.\d\dx \(\d+\.\d\d–\d+\.\d\d\) \|", line), line


def test_compiled_engine_compiles_before_its_timed_runs(tmp_path, monkeypatch):
    """One batch a run (one window, batch 1): the engine runs that batch eagerly the first
    time and compiles the second, so the warm-up must cover both; no timed run compiles."""
    from torch._dynamo.utils import counters

    from scca_eval.bench import model as bench_model

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    compiled_during = []

    def wall_s(run, device):
        before = counters["stats"].get("unique_graphs", 0)
        seconds = timing_wall_s(run, device)
        compiled_during.append(counters["stats"].get("unique_graphs", 0) - before)
        return seconds

    timing_wall_s = bench_model.wall_s
    monkeypatch.setattr(bench_model, "wall_s", wall_s)
    torch._dynamo.reset()
    counters.clear()
    result = model_bench(str(config), ctxs=(48,), patterns=("full", "s2"), backends=("chunked",), batch_size=1,
                         tokens_per_run=48, repeats=2, plain=False, compile=True, device="cpu", log=None)
    assert [row["error"] for row in result["rows"]] == [None, None]
    assert counters["stats"].get("unique_graphs", 0) > 0  # it did compile
    assert compiled_during == [0, 0, 0, 0]  # two timed runs of each pattern, none compiling


def test_cli_attention_on_cpu_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    result = CliRunner().invoke(bench, ["attention", "--n", "64", "--heads", "2", "--head-dim", "8",
                                        "--pattern", "s2", "--backend", "chunked", "--repeats", "1",
                                        "--json", str(out)])
    assert result.exit_code == 0, result.output
    if not torch.cuda.is_available():
        assert "on CPU" in result.output
    data = json.loads(out.read_text())
    assert data["rows"][0]["pattern"] == "s2" and data["rows"][0]["n"] == 64


@pytest.mark.parametrize("args,message", [
    (["attention", "--n", "1"], "--n must be at least 2"),
    (["attention", "--pattern", "nonsense"], "nonsense"),
    (["attention", "--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["attention", "--mode", "bwd"], "--mode 'bwd' is not a mode"),
    (["model", "--backend", "fast"], "unknown attention backend 'fast'"),
    (["model", "--ctx", "1"], "--ctx must be at least 2"),
    (["model", "--shape", "no-such-shape.json"], "no-such-shape.json"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capfd):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def _without(key: str, **more) -> dict:
    return {**{k: v for k, v in TINY.items() if k != key}, **more}


@pytest.mark.parametrize("values,missing", [({}, "lacks hidden_size, intermediate_size, num_hidden_layers"),
                                            (_without("vocab_size"), "lacks vocab_size:"),
                                            (_without("num_hidden_layers", model_type="llama"),
                                             "lacks num_hidden_layers:")])
def test_a_config_without_the_shape_is_refused(values, missing, tmp_path, capfd):
    """Transformers' defaults would build some other model (a 7B one for LLaMA): refused up front."""
    from scca_eval.cli import main

    config = tmp_path / "shape.json"
    config.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "model", "--shape", str(config), "--ctx", "48", "--device", "cpu"])
    err = capfd.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and missing in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_cli_write_table_needs_a_gpu(tmp_path, capfd):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "attention", "--n", "64", "--write-table", str(tmp_path / "table.json")])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capfd.readouterr().err
    assert not (tmp_path / "table.json").exists()
