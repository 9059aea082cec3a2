"""`ppl --compile`: compiled decoder layers and loss step give the numbers of the
eager engine and of the independent plain loop, within float noise."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_perplexity import _texts, reference_perplexity


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
    expected, expected_tokens = reference_perplexity(model, tokenizer, _texts(sample_data_dir), 128, 128)

    common = ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", "128",
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
