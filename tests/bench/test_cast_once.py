"""benchmarks/cast_once.py on CPU at a tiny random shape: both variants train from the same
start, the first loss is the same, and casting once issues fewer casts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def test_cast_once_against_autocast_per_reader(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("cast_once", REPO / "benchmarks" / "cast_once.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["cast_once.py", "--shape", str(config), "--ctx", "32", "--steps", "3",
                                      "--device", "cpu", "--json", str(out)])
    script.main()
    result = json.loads(out.read_text())
    per_reader, once = result["per_reader"], result["once"]
    assert len(per_reader["losses"]) == len(once["losses"]) == 3
    assert per_reader["losses"][0] == once["losses"][0]
    assert 0 < once["casts_per_step"] < per_reader["casts_per_step"]
