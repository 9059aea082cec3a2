"""benchmarks/ctx_scaling.py on CPU at a tiny shape: the cells it measures, the time budget,
the compiled comparison it asks for, and the table and plot rendered from the JSON alone."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ctx_scaling", REPO / "benchmarks" / "ctx_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ctx, pattern, seconds, flops, memory=None):
    return {"ctx": ctx, "pattern": pattern, "seconds": seconds, "us_per_token": seconds / ctx * 1e6,
            "peak_memory_gib": memory, "flops": flops, "mean_nll": 5.0, "error": None}


def test_table_from_json(script, tmp_path):
    result = {"shape": "llama2-7b", "layers": 32, "dtype": "bfloat16", "device": "GPU", "torch": "x",
              "patterns": ["full", "s2"], "ctxs": [8192, 16384], "compiled": None,
              "rows": [_row(8192, "full", 0.4, 8e15, 14.0), _row(8192, "s2", 0.32, 6e15, 14.5),
                       _row(16384, "full", 1.0, 2e16, 15.0),
                       {"ctx": 16384, "pattern": "s2", "error": "skipped: about 9 s predicted, 3 s of the "
                                                                "time budget left"}]}
    table = script.markdown(result)
    # 0.4 / 0.32 = 1.25x faster; 8e15 / 6e15 = 1.33x fewer FLOPs; 0.4 s / 8192 tokens = 48.83 us
    assert "| 8192 | 48.83 | 39.06 (1.25x; 1.33x) |" in table
    assert "| 16384 | 61.04 | skipped (time budget) |" in table
    assert "| 8192 | 14.0 | 14.5 |" in table  # peak memory
    source = tmp_path / "run" / "ctx_scaling.json"
    source.parent.mkdir()
    source.write_text(json.dumps(result))
    script.main(["--render", str(source)])
    assert (source.parent / "ctx_scaling.md").read_text() == table
    if importlib.util.find_spec("matplotlib"):
        assert (source.parent / "ctx_scaling.png").stat().st_size > 0


def test_prediction_grows_like_the_last_doubling(script):
    rows = [_row(8192, "full", 1.0, 1), _row(16384, "full", 3.0, 1)]
    assert script._predicted_seconds(rows, "full", 32768) == pytest.approx(9.0)
    assert script._predicted_seconds(rows, "full", 65536) == pytest.approx(27.0)
    rows = [_row(8192, "s2", 1.0, 1), _row(16384, "s2", 1.5, 1)]  # less than the tokens: at least 2x
    assert script._predicted_seconds(rows, "s2", 32768) == pytest.approx(3.0)
    assert script._predicted_seconds(rows[:1], "s2", 16384) == pytest.approx(4.0)  # one cell: 4x
    assert script._predicted_seconds(rows, "sda", 16384) is None


def test_measures_every_cell_and_keeps_to_the_budget(script, tmp_path, monkeypatch):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    asked = {}

    def fake_model_bench(shape, ctxs, patterns, **options):
        asked.update(shape=shape, ctxs=ctxs, patterns=patterns, **options)
        return {"rows": []}

    monkeypatch.setattr(script, "model_bench", fake_model_bench)
    monkeypatch.setattr(script, "markdown_model", lambda result: "compiled table\n")
    out = tmp_path / "out"
    script.main([str(out), "--shape", str(config), "--ctx", "32,64", "--patterns", "full,s2",
                 "--essential-ctx", "32", "--compiled-ctx", "48", "--device", "cpu"])
    result = json.loads((out / "ctx_scaling.json").read_text())
    cells = {(r["ctx"], r["pattern"]): r for r in result["rows"]}
    assert set(cells) == {(32, "full"), (32, "s2"), (64, "full"), (64, "s2")}
    for row in cells.values():
        assert row["error"] is None and math.isfinite(row["mean_nll"])
        assert row["us_per_token"] == pytest.approx(row["seconds"] / row["ctx"] * 1e6)
    # the sparse pattern computes something else than full attention on the same window
    assert cells[64, "s2"]["mean_nll"] != cells[64, "full"]["mean_nll"]
    assert cells[64, "s2"]["flops"] < cells[64, "full"]["flops"]
    # which kernel auto ran, beside each cell: on a CPU, the chunked one
    assert cells[64, "s2"]["kernel"] == "chunked" and cells[64, "full"]["kernel"] == "sdpa"
    assert "The kernel auto ran:" in (out / "ctx_scaling.md").read_text()
    assert "| 64 | chunked |" in (out / "ctx_scaling.md").read_text()
    assert asked["ctxs"] == [48] and asked["patterns"] == ["full"] and asked["compile"] is True
    assert asked["tokens_per_run"] == 48 and asked["repeats"] == 3
    assert "compiled table" in (out / "ctx_scaling.md").read_text()

    # no time left: a cell with a predicted time is skipped, and says so
    script.main([str(out), "--shape", str(config), "--ctx", "32,64", "--patterns", "full",
                 "--compiled-ctx", "0", "--budget-s", "0", "--device", "cpu"])
    rows = json.loads((out / "ctx_scaling.json").read_text())["rows"]
    assert rows[0]["error"] is None  # nothing to predict from: measured
    assert rows[1]["error"].startswith("skipped: about")
    assert "skipped (time budget)" in (out / "ctx_scaling.md").read_text()
