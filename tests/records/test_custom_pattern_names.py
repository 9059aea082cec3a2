"""Custom pattern mixes get distinct record names ("custom-<8 hex>"), presets keep theirs,
and tables still group and label the records by their pattern settings."""

from __future__ import annotations

import hashlib
import json

import pytest

from scca_eval.api import evaluate, record_pattern_name
from scca_eval.patterns.parse import resolve_pattern
from helpers import run_cli

MIX_A = "1/2 local + 1/2 cross(1)"
MIX_B = "1/2 local + 1/2 shifted"


def expected_name(canonical_text: str) -> str:
    return "custom-" + hashlib.sha256(canonical_text.encode("utf-8")).hexdigest()[:8]


def test_names_of_presets_and_mixes():
    assert record_pattern_name(resolve_pattern("s2")) == "s2"
    assert record_pattern_name(resolve_pattern("SCCA-fixed")) == "scca_fixed"
    assert record_pattern_name(resolve_pattern("full")) == "full"
    assert record_pattern_name(resolve_pattern(MIX_A)) == expected_name("1/2 local + 1/2 cross(1)")
    # The same mix written another way (decimals, default parameter, YAML list) has the same name.
    for same in ("0.5 local + 0.5 cross", [{"share": 0.5, "rule": "local"}, {"share": "1/2", "rule": "cross(1)"}]):
        assert record_pattern_name(resolve_pattern(same)) == record_pattern_name(resolve_pattern(MIX_A))
    assert record_pattern_name(resolve_pattern(MIX_B)) != record_pattern_name(resolve_pattern(MIX_A))


def test_two_mixes_write_two_records_and_two_table_rows(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    records = []
    for mix in (MIX_A, MIX_B):
        records += evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=64, pattern=mix,
                            max_tokens=256, device="cpu", out=str(tmp_path))
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(files) == 2
    assert {r["pattern"] for r in records} == {expected_name(MIX_A), expected_name(MIX_B)}
    assert all(r["config"]["pattern"]["name"] == "custom" for r in records)  # settings keep the spec's name
    assert records[0]["metrics"]["perplexity"] != records[1]["metrics"]["perplexity"]

    code, out, err = run_cli(["table", str(tmp_path), "--digits", "4"], capsys)
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()
            if line.startswith("| 1/2")}
    # One row per mix, labelled by its groups, holding that record's value.
    for record, mix in zip(records, (MIX_A, MIX_B)):
        label = resolve_pattern(mix).canonical()
        assert rows[label].strip("*") == f"{record['metrics']['perplexity']:.4f}"
    stored = [json.loads((tmp_path / name).read_text())["pattern"] for name in files]
    assert sorted(stored) == sorted(r["pattern"] for r in records)
