"""`scca-eval compare` and its CI gate: matching, refusals, and exit codes 0 / 1 / 2."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

from scca_eval.errors import UserError
from scca_eval.report.compare import compare_records
from scca_eval.records import write_record

N_DOCS = 40
WORSE_HEAD_SCALE = 3.1  # the tiny random model with its output layer sharpened: about 10% worse


def make_record(docs, *, model="base-model", task="pg19_sample", pattern="full", ctx=1024, stride=None,
                tokenizer="tok-a", data="data-a", protocol="stride", max_tokens=None, last_window=None):
    """A record whose documents are ``docs`` = [(id, nll_sum, tokens)]; metrics follow from them."""
    nll = math.fsum(d[1] for d in docs)
    tokens = sum(d[2] for d in docs)
    return {
        "schema": 1, "model": model, "task": task, "pattern": pattern, "ctx": ctx, "stride": stride or ctx,
        "metrics": {"perplexity": math.exp(nll / tokens), "nll_sum": nll, "tokens": tokens, "ci95": None},
        "documents": [{"id": i, "nll_sum": n, "tokens": t, "bytes": None, "words": None} for i, n, t in docs],
        "skipped_documents": [],
        "config": {"protocol": protocol, "model": {"id": model, "fingerprint": {"digest": f"sha256:{model}"}},
                   "pattern": {"name": pattern, "groups": pattern, "chunk_size": None, "chunk_ratio": "1/4",
                               "dilation": None},
                   "data_fingerprint": data, "tokenizer_fingerprint": tokenizer, "add_bos": False,
                   "max_tokens": max_tokens, "dtype": "float32", "bootstrap_seed": 0, "versions": {},
                   **({"last_window": last_window} if last_window else {})},
        "runtime": {"seconds": 1.0},
    }


def base_docs():
    rng = np.random.default_rng(7)
    tokens = rng.integers(200, 2000, size=N_DOCS)
    mean_nll = rng.uniform(2.0, 3.0, size=N_DOCS)  # documents differ a lot in difficulty
    return [(f"doc{i}", float(mean_nll[i] * tokens[i]), int(tokens[i])) for i in range(N_DOCS)]


def scaled(docs, factor_per_doc):
    """Each document's perplexity multiplied by its factor: NLL + tokens * log(factor)."""
    return [(i, n + t * math.log(f), t) for (i, n, t), f in zip(docs, factor_per_doc)]


def ppl(docs):
    return math.exp(math.fsum(d[1] for d in docs) / sum(d[2] for d in docs))


def independent_interval(base, new, n_boot=2000, seed=1):
    """A plain paired bootstrap of ppl_new / ppl_base - 1 over documents (a loop, no shared code)."""
    rng = np.random.default_rng(seed)
    diffs = np.array([n[1] - b[1] for b, n in zip(base, new)])
    tokens = np.array([b[2] for b in base], dtype=float)
    samples = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(base), size=len(base))
        samples.append(math.expm1(diffs[pick].sum() / tokens[pick].sum()))
    return np.percentile(samples, [2.5, 97.5])


@pytest.fixture
def sides(tmp_path):
    """Writes base and new records (two patterns × two ctx) to folders; returns a writer."""
    def write(new_factors, **new_options):
        docs = base_docs()
        for pattern in ("full", "s2"):
            for ctx in (1024, 2048):
                write_record(make_record(docs, pattern=pattern, ctx=ctx), tmp_path / "base")
                options = {"model": "new-model", **new_options}
                write_record(make_record(scaled(docs, new_factors), pattern=pattern, ctx=ctx, **options),
                             tmp_path / "new")
        return str(tmp_path / "base"), str(tmp_path / "new")
    return write


def test_clear_regression_fails_the_gate(sides, capsys):
    base, new = sides([1.05] * N_DOCS)  # every document 5% worse
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 1
    expected_base = ppl(base_docs())
    assert f"| pg19_sample | full | 1024 | {expected_base:.3f} | {expected_base * 1.05:.3f} | +5.00% |" in out
    assert out.count("**regression**") == 4
    assert "**Gate failed**: 4 of 4 cell(s)" in out


def test_noise_passes_the_gate(sides, capsys):
    # Documents move in both directions: the total rises by more than 1%, but the paired
    # bootstrap cannot tell it from zero.
    factors = [1.10 if i % 2 else 0.93 for i in range(N_DOCS)]
    docs = base_docs()
    change = ppl(scaled(docs, factors)) / ppl(docs) - 1
    low, high = independent_interval(docs, scaled(docs, factors))
    assert change > 0.01 and low < 0 < high  # the premise, checked independently
    base, new = sides(factors)
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 0, out
    assert out.count("no significant change") == 4 and f"{change:+.2%}" in out
    assert "**Gate passed**" in out


def test_improvement_passes_the_gate(sides, capsys):
    base, new = sides([0.95] * N_DOCS)
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 0
    assert out.count("| better |") == 4 and "-5.00%" in out


def test_small_significant_regression_within_tolerance(sides, capsys):
    base, new = sides([1.005] * N_DOCS)  # significant, but only 0.5%
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 0 and out.count("| worse |") == 4
    code, out, err = run_cli(["compare", base, new, "--max-regression", "0.25"], capsys)
    assert code == 1


def test_numbers_match_an_independent_computation():
    docs = base_docs()
    factors = np.linspace(0.97, 1.09, N_DOCS)
    new_docs = scaled(docs, factors)
    result = compare_records([make_record(docs)], [make_record(new_docs, model="x")], n_boot=4000)
    (cell,) = result.cells
    assert cell.base_perplexity == pytest.approx(ppl(docs), rel=1e-12)
    assert cell.new_perplexity == pytest.approx(ppl(new_docs), rel=1e-12)
    assert cell.relative_change == pytest.approx(ppl(new_docs) / ppl(docs) - 1, rel=1e-9)
    low, high = independent_interval(docs, new_docs, n_boot=4000)
    width = high - low
    assert cell.ci95[0] == pytest.approx(low, abs=0.1 * width)
    assert cell.ci95[1] == pytest.approx(high, abs=0.1 * width)
    assert result.differences == ["model base-model → x", "weights base-model → x"]


def test_an_adapter_and_a_rope_scaling_that_differ_are_named_in_a_few_words():
    docs = base_docs()
    base, new = make_record(docs), make_record(docs)
    base["config"]["model"]["adapter"] = {"path": "ckpt/s2", "fingerprint": {"digest": "sha256:" + "a" * 64},
                                          "training_pattern": "s2", "r": 8, "target_modules": ["q_proj"]}
    new["config"]["model"]["adapter"] = {"path": "ckpt/longmixed", "fingerprint": {"digest": "sha256:" + "b" * 64},
                                         "training_pattern": "longmixed", "r": 8, "target_modules": ["q_proj"]}
    new["config"]["model"]["rope_scaling"] = {"rope_type": "linear", "factor": 2.0, "requested": "linear:2"}
    result = compare_records([base], [new])
    assert result.differences == ["adapter ckpt/s2 (aaaaaaaaaaaa, trained under s2) → "
                                  "ckpt/longmixed (bbbbbbbbbbbb, trained under longmixed)",
                                  "RoPE scaling None → linear:2"]


def test_versions_that_differ_are_named():
    docs = base_docs()
    base, new = make_record(docs), make_record(docs)
    base["config"]["versions"] = {"scca_eval": "0.1.0", "torch": "2.13.0", "transformers": "5.25.0"}
    new["config"]["versions"] = {"scca_eval": "0.2.0", "torch": "2.13.0", "transformers": "5.26.0"}
    assert compare_records([base], [new]).differences == ["scca-eval 0.1.0 → 0.2.0", "transformers 5.25.0 → 5.26.0"]


def test_cells_on_one_side_are_listed(sides, tmp_path, capsys):
    base, new = sides([1.0] * N_DOCS)
    write_record(make_record(base_docs(), pattern="longmixed", ctx=4096), tmp_path / "base")
    write_record(make_record(base_docs(), task="proof_pile_sample"), tmp_path / "new")
    code, out, err = run_cli(["compare", base, new], capsys)
    assert code == 0
    assert "Only in base (1, not compared): pg19_sample · longmixed · ctx 4096." in out
    assert "Only in new (1, not compared): proof_pile_sample · full · ctx 1024." in out


def test_a_cell_missing_on_the_new_side_fails_the_gate_unless_allowed(sides, tmp_path, capsys):
    # a CI run that died part-way leaves cells out: the gate could not test them
    base, new = sides([1.0] * N_DOCS)
    write_record(make_record(base_docs(), pattern="longmixed", ctx=4096), tmp_path / "base")
    write_record(make_record(base_docs(), task="proof_pile_sample"), tmp_path / "new")  # only in new: harmless
    json_path = tmp_path / "cmp.json"
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1", "--json", str(json_path)], capsys)
    assert code == 1
    assert ("Only in base (1, not compared; they fail the gate (--allow-missing lets them pass)): "
            "pg19_sample · longmixed · ctx 4096.") in out
    assert "**Gate failed**: 1 cell(s) of the base are missing on the new side: pg19_sample · longmixed · ctx 4096." \
        in out
    assert json.loads(json_path.read_text())["passed"] is False
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1", "--allow-missing"], capsys)
    assert code == 0 and "**Gate passed**" in out
    assert "Only in base (1, not compared): pg19_sample · longmixed · ctx 4096." in out


def test_step_summary_is_appended(sides, tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    base, new = sides([1.05] * N_DOCS)
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    text = summary.read_text()
    assert code == 1 and text.startswith("earlier step\n") and out.strip() in text


@pytest.mark.parametrize("change,message", [
    ({"tokenizer": "tok-b"}, "the tokenizers differ"),
    ({"data": "data-b"}, "the task data differ"),
    ({"protocol": "longlora"}, "the protocols differ"),
    ({"stride": 512}, "the strides differ"),
    ({"max_tokens": 4096}, "--max-tokens differs"),
    ({"last_window": "full"}, "the last windows differ"),  # base: a record from before --last-window
])
def test_incomparable_records_are_refused(sides, capsys, change, message):
    base, new = sides([1.05] * N_DOCS, **change)
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_other_documents_are_refused():
    docs = base_docs()
    renamed = [(f"other{i}", n, t) for i, n, t in docs]
    with pytest.raises(UserError, match="different documents"):
        compare_records([make_record(docs)], [make_record(renamed)])
    shorter = [(i, n / 2, t // 2) for i, n, t in docs]  # e.g. another --max-tokens budget
    with pytest.raises(UserError, match="scored tokens"):
        compare_records([make_record(docs)], [make_record(shorter)])


def test_bad_input_exits_2(sides, tmp_path, capsys):
    base, new = sides([1.0] * N_DOCS)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    duplicate = tmp_path / "dup"
    docs = base_docs()
    write_record(make_record(docs, model="a"), duplicate)
    write_record(make_record(docs, model="b"), duplicate)
    other_task = tmp_path / "other"
    write_record(make_record(docs, task="elsewhere"), other_task)
    cases = [
        ([base, str(tmp_path / "missing")], "no such result file"),
        ([base, str(broken)], "not a valid result file"),
        ([str(duplicate), new], "two records"),
        ([base, str(other_task)], "share no (task, pattern, ctx) cell"),
        ([base, new, "--max-regression", "-1"], "--max-regression"),
        ([base, new, "--alpha", "2"], "--alpha"),
    ]
    for args, message in cases:
        code, out, err = run_cli(["compare", *args], capsys)
        assert code == 2, args
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_cell_too_small_for_a_test_fails_the_gate_closed():
    # One document and no per-window sums (a record from before they were kept): no test.
    docs = base_docs()[:1]
    result = compare_records([make_record(docs)], [make_record(scaled(docs, [1.0]))], max_regression=1)
    assert not result.passed and result.cells[0].significant is None
    text = result.to_markdown()
    assert "not testable" in text and "fails the gate" in text and "**Gate failed**" in text
    # Without a gate the same comparison only reports.
    assert compare_records([make_record(docs)], [make_record(docs)]).passed
    assert "--max-tokens" not in text
    # When the records were capped, the line names the cap as the cause.
    capped = [make_record(docs), make_record(scaled(docs, [1.0]))]
    for record in capped:
        record["config"]["max_tokens"] = 4096
    text = compare_records([capped[0]], [capped[1]], max_regression=1).to_markdown()
    assert "capped at --max-tokens 4,096" in text


def one_stream(n_windows, factor=1.0, noise=0.0, seed=0, window_tokens=255):
    """A single-document record whose per-window sums are kept (``windows``), each window's
    mean NLL varying along the stream; ``factor`` multiplies the perplexity, ``noise`` adds
    per-window jitter to the mean NLL (a checkpoint that differs window by window)."""
    from scca_eval.evaluation.window_sums import encode_windows

    rng = np.random.default_rng(seed)
    tokens = np.full(n_windows, window_tokens)
    tokens[0] -= 1  # the first window scores one target fewer
    mean = 2.5 + 0.5 * np.sin(np.arange(n_windows) / 7)  # neighbouring windows are alike
    nll = tokens * (mean + math.log(factor) + noise * rng.standard_normal(n_windows))
    record = make_record([("stream", float(math.fsum(nll)), int(tokens.sum()))])
    record["documents"][0]["windows"] = encode_windows(nll, tokens)
    return record


def test_a_single_stream_regression_fails_the_gate():
    base = one_stream(120)
    worse = one_stream(120, factor=1.10, noise=0.05, seed=1)
    result = compare_records([base], [worse], max_regression=1)
    (cell,) = result.cells
    assert cell.relative_change == pytest.approx(0.10, abs=0.01)
    assert cell.significant and cell.regression and not result.passed
    assert cell.unit.startswith("blocks of 5 windows")  # round(120 ** (1/3)) = 5, 24 blocks
    # A checkpoint that differs only by noise passes: the test can go either way.
    same = one_stream(120, factor=1.0, noise=0.05, seed=2)
    assert compare_records([base], [same], max_regression=1).passed


def test_block_interval_equals_a_plain_block_bootstrap_loop():
    """The block bootstrap's interval against a loop written out here (its own draws)."""
    from scca_eval.evaluation.window_sums import decode_windows

    base, new = one_stream(120), one_stream(120, factor=1.03, noise=0.05, seed=3)
    (cell,) = compare_records([base], [new]).cells
    nll_b, tokens = decode_windows(base["documents"][0], "base")
    nll_n, _ = decode_windows(new["documents"][0], "new")
    blocks = [(nll_n[i:i + 5].sum() - nll_b[i:i + 5].sum(), tokens[i:i + 5].sum()) for i in range(0, 120, 5)]
    rng = np.random.default_rng(11)
    samples = []
    for _ in range(4000):
        pick = rng.integers(0, len(blocks), size=len(blocks))
        samples.append(math.expm1(sum(blocks[j][0] for j in pick) / sum(blocks[j][1] for j in pick)))
    low, high = np.percentile(samples, [2.5, 97.5])
    assert cell.ci95[0] == pytest.approx(low, abs=0.003) and cell.ci95[1] == pytest.approx(high, abs=0.003)


def test_too_few_windows_fail_the_gate_closed():
    base, worse = one_stream(6), one_stream(6, factor=1.10)
    result = compare_records([base], [worse], max_regression=1)
    assert not result.passed and result.cells[0].significant is None
    assert "fewer than 10" in result.cells[0].untested_reason
    # the note under the table: one sentence, with the gate's consequence only where a gate is set
    gated = [line for line in result.to_markdown().splitlines() if ": not testable: " in line]
    assert len(gated) == 1 and gated[0].endswith("more windows; so it fails the gate (it cannot show that it did not regress).")
    ungated = [line for line in compare_records([base], [worse]).to_markdown().splitlines() if ": not testable: " in line]
    assert len(ungated) == 1 and ungated[0].endswith("more windows.")


def test_inputs_are_not_modified():
    docs = base_docs()
    base, new = [make_record(docs)], [make_record(scaled(docs, [1.05] * N_DOCS))]
    before = copy.deepcopy((base, new))
    compare_records(base, new)
    assert (base, new) == before


def _code_blocks(text: str, language: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.startswith("```") and not inside and line[3:].strip() == language:
            inside, current = True, []
        elif line.startswith("```") and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def _scca_eval_lines(script: str, env: dict[str, str]) -> list[str]:
    import re

    joined = script.replace("\\\n", " ")
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), joined)
    return [line.strip() for line in expanded.splitlines() if line.strip().startswith("scca-eval ")]


def test_the_documented_workflow_uses_real_options():
    """Every scca-eval command in docs/ci.md parses with the real CLI (options, types)."""
    import shlex
    from pathlib import Path

    import yaml

    from scca_eval.cli import cli

    text = (Path(__file__).resolve().parents[2] / "docs" / "ci.md").read_text(encoding="utf-8")
    (workflow_text,) = _code_blocks(text, "yaml")
    workflow = yaml.safe_load(workflow_text)
    env = {key: str(value) for key, value in workflow["env"].items()}
    steps = workflow["jobs"]["perplexity"]["steps"]
    lines = [line for step in steps if "run" in step for line in _scca_eval_lines(step["run"], env)]
    lines += [line for block in _code_blocks(text, "bash") for line in _scca_eval_lines(block, env)]
    commands = [shlex.split(line)[1:] for line in lines]
    assert [c[0] for c in commands] == ["ppl", "compare", "ppl"]
    for name, *args in commands:
        command = cli.get_command(None, name)
        with command.make_context(name, list(args)):
            pass
    evaluate_ci, gate, evaluate_baseline = commands
    assert gate[1:3] == ["results/baseline", "new"] and "--max-regression" in gate
    # CI evaluates exactly as the baseline was made, apart from where the records go
    strip = lambda args: [a for a in args if a not in ("--out", "new", "results/baseline", "--model", "default")]
    assert strip(evaluate_ci) == strip(evaluate_baseline)


def test_a_worse_checkpoint_on_one_document_fails_the_gate(tiny_model_dir, tmp_path, capsys):
    """End to end: `ppl` on a single text file with the tiny model and with a checkpoint whose
    output layer is sharpened (about 10% worse perplexity), then `compare --max-regression 1`:
    the gate tests the single document through blocks of its windows and exits 1; the base
    against itself passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import sample_slice

    worse_dir = tmp_path / "worse"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(WORSE_HEAD_SCALE)
    model.save_pretrained(worse_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(worse_dir)
    text = tmp_path / "book.txt"
    text.write_text(sample_slice("pg19_sample/carroll_alice.txt", 9000), encoding="utf-8")

    for name, folder in (("base", tiny_model_dir), ("new", worse_dir)):
        code, _, err = run_cli(["ppl", "--model", str(folder), "--data", str(text), "--ctx", "64", "--device",
                                "cpu", "--quiet", "--out", str(tmp_path / name)], capsys)
        assert code in (0, None), err
    code, out, _ = run_cli(["compare", str(tmp_path / "base"), str(tmp_path / "new"), "--max-regression", "1"],
                           capsys)
    change = float(out.split("| +")[1].split("%")[0]) / 100
    assert 0.07 < change < 0.13, out
    assert code == 1 and "**regression**" in out and "blocks of" in out
    code, out, _ = run_cli(["compare", str(tmp_path / "base"), str(tmp_path / "base"), "--max-regression", "1"],
                           capsys)
    assert code in (0, None) and "Gate passed" in out


def test_a_record_of_schema_1_is_compared_by_its_tokenizer_summary():
    """Schema 1 stored a digest of the tokenizer's serialized form, which changes with the
    `tokenizers` release: such a record and a new one of the same tokenizer compare; another
    tokenizer is still refused."""
    from scca_eval.report.compare import compare_records

    summary = {"name": "default", "class": "TokenizersBackend", "vocab_size": 49152, "bos_token_id": 1,
               "eos_token_id": 2, "adds_bos": False, "adds_eos": False}
    old = make_record(base_docs(), tokenizer="serialized-digest")
    old["config"]["model"]["tokenizer"] = {**summary, "fingerprint": "sha256:old-kind"}
    new = make_record(base_docs(), tokenizer="definition-digest")
    new["schema"] = 2
    new["config"]["model"]["tokenizer"] = {**summary, "fingerprint": "definition-digest"}
    compare_records([old], [new])
    other = make_record(base_docs(), tokenizer="definition-digest-b")
    other["schema"] = 2
    other["config"]["model"]["tokenizer"] = {**summary, "vocab_size": 32000, "fingerprint": "definition-digest-b"}
    with pytest.raises(UserError, match="the tokenizers differ"):
        compare_records([old], [other])
    # Both of schema 2: the fingerprints decide.
    with pytest.raises(UserError, match="the tokenizers differ"):
        compare_records([new], [{**other, "config": {**other["config"], "model": new["config"]["model"]}}])


def test_json_holds_every_cell_as_the_report_shows_it(sides, tmp_path, capsys):
    """compare --json: the cells' numbers (the change checked against the documents' own
    perplexities), verdicts and interval as in the markdown report, and the gate's outcome."""
    import json

    factors = [1.05] * N_DOCS
    base, new = sides(factors)
    out_json = tmp_path / "compare.json"
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1", "--json", str(out_json)], capsys)
    assert code == 1
    data = json.loads(out_json.read_text())
    assert data["passed"] is False and data["max_regression"] == 1 and data["base"] == base
    assert sorted((c["pattern"], c["ctx"]) for c in data["cells"]) == [("full", 1024), ("full", 2048),
                                                                       ("s2", 1024), ("s2", 2048)]
    expected = ppl(scaled(base_docs(), factors)) / ppl(base_docs()) - 1
    for cell in data["cells"]:
        assert cell["relative_change"] == pytest.approx(expected, rel=1e-9)
        assert cell["verdict"] == "regression" and cell["significant"] is True
        low, high = cell["ci95"]
        assert f"| {cell['relative_change']:+.2%} | {low:+.2%} … {high:+.2%} |" in out
    code, out, err = run_cli(["compare", base, new, "--json", str(out_json)], capsys)  # no gate
    data = json.loads(out_json.read_text())
    assert code == 0 and data["passed"] is None and {c["verdict"] for c in data["cells"]} == {"worse"}


def test_json_and_output_may_not_name_one_file(sides, tmp_path, capsys):
    base, new = sides([1.0] * N_DOCS)
    same = tmp_path / "report"
    code, out, err = run_cli(["compare", base, new, "--output", str(same), "--json", str(same)], capsys)
    assert code == 2 and "give each its own file" in err and len(err.strip().splitlines()) == 1
    assert not same.exists()
    code, out, err = run_cli(["compare", base, new, "--json", str(tmp_path)], capsys)  # a folder
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out


@pytest.mark.parametrize("side", ["base", "new"])
def test_a_perplexity_that_is_not_finite_fails_the_gate(tmp_path, capsys, side):
    # A model with a NaN weight gives NaN losses: its record is true, but the cell can never pass.
    docs = base_docs()
    broken = [(i, math.nan if index == 3 else n, t) for index, (i, n, t) in enumerate(docs)]
    record = make_record(broken, model="new-model")
    record["metrics"]["perplexity"] = math.nan
    write_record(make_record(docs) if side == "new" else record, tmp_path / "base")
    write_record(record if side == "new" else make_record(docs, model="new-model"), tmp_path / "new")
    json_path = tmp_path / "cmp.json"
    code, out, err = run_cli(["compare", str(tmp_path / "base"), str(tmp_path / "new"), "--max-regression", "1",
                              "--json", str(json_path)], capsys)
    assert code == 1, out
    assert "**not finite: fails the gate**" in out and "better" not in out and "Gate passed" not in out
    assert f"the {side} perplexity is nan" in out
    assert "**Gate failed**: 1 cell(s) have a perplexity that is not finite" in out
    # strict JSON: no bare NaN
    report = json.loads(json_path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert report["passed"] is False and report["cells"][0]["not_finite"] is True
    assert report["cells"][0][f"{side}_perplexity"] is None


def test_a_perplexity_that_is_not_finite_is_said_without_a_gate(tmp_path, capsys):
    docs = base_docs()
    record = make_record(docs, model="new-model")
    record["metrics"]["perplexity"] = math.inf
    write_record(make_record(docs), tmp_path / "base")
    write_record(record, tmp_path / "new")
    code, out, err = run_cli(["compare", str(tmp_path / "base"), str(tmp_path / "new")], capsys)
    assert code == 0
    assert "| not finite |" in out and "the new perplexity is inf" in out


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_threshold_that_is_not_a_finite_percentage_is_refused(sides, capsys, value):
    base, new = sides([1.0] * N_DOCS)
    code, out, err = run_cli(["compare", base, new, "--max-regression", value], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--max-regression must be a finite number" in err


@pytest.mark.parametrize("option", ["--output", "--json"])
def test_a_report_never_replaces_a_record_it_reads(sides, capsys, option):
    base, new = sides([1.0] * N_DOCS)
    (record_path,) = sorted(Path(base).glob("*full__ctx1024.json"))
    before = record_path.read_bytes()
    code, out, err = run_cli(["compare", base, new, option, str(record_path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "is one of the files this report reads" in err
    assert record_path.read_bytes() == before


def test_a_report_never_replaces_a_record_or_progress_file_elsewhere(sides, tmp_path, capsys):
    base, new = sides([1.0] * N_DOCS)
    other = write_record(make_record(base_docs(), model="other-model"), tmp_path / "other")
    before = other.read_bytes()
    progress = tmp_path / "other" / (other.name + ".progress")
    progress.write_text("{}")
    for args in (["compare", base, new, "--json", str(other)], ["table", base, "-o", str(other)]):
        code, out, err = run_cli(args, capsys)
        assert code == 2 and "holds a scca-eval result record" in err and err.count("\n") == 1
    code, out, err = run_cli(["table", base, "-o", str(progress)], capsys)
    assert code == 2 and "progress file" in err
    assert other.read_bytes() == before and progress.read_text() == "{}"



def test_a_report_never_replaces_a_fine_tune_runs_files(sides, tmp_path, capsys):
    """training.json and adapter_config.json are kept too; an earlier report may be replaced."""
    from scca_eval.records.build import TRAINING_RECORD_KIND

    base, new = sides([1.0] * N_DOCS)
    run = tmp_path / "ckpt"
    run.mkdir()
    (run / "training.json").write_text(json.dumps({"schema": 2, "kind": TRAINING_RECORD_KIND, "steps": 3}))
    (run / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    kept = {name: (run / name).read_bytes() for name in ("training.json", "adapter_config.json")}
    for name, kind in (("training.json", "the training record of a fine-tune run"),
                       ("adapter_config.json", "a LoRA adapter's config")):
        for args in (["compare", base, new, "--json", str(run / name)], ["table", base, "-o", str(run / name)]):
            code, out, err = run_cli(args, capsys)
            assert code == 2 and f"holds {kind}" in err and err.count("\n") == 1, err
    assert {name: (run / name).read_bytes() for name in kept} == kept
    report = tmp_path / "report.json"
    for _ in range(2):  # the second run replaces the first one's report
        code, out, err = run_cli(["compare", base, new, "--json", str(report)], capsys)
        assert code == 0, err


def test_a_compare_report_inside_a_results_folder_is_passed_over(sides, capsys):
    from scca_eval.records import existing_records

    base, new = sides([1.0] * N_DOCS)
    report = Path(new) / "cmp.json"
    assert run_cli(["compare", base, new, "--json", str(report)], capsys)[0] == 0
    assert json.loads(report.read_text())["format"] == "scca-eval compare"
    # the folder still reads as its four records: table, compare (again, over the report) and a sweep's reuse
    code, out, err = run_cli(["table", new], capsys)
    assert code == 0 and out.count("| **10.92** |") == 2
    code, out, err = run_cli(["compare", base, new, "--json", str(report)], capsys)
    assert code == 0 and out.count("no significant change") == 4
    said = []
    assert len(existing_records(new, said.append)) == 4 and said == []
    # a report written before it carried its format is passed over too
    older = json.loads(report.read_text())
    del older["format"]
    report.write_text(json.dumps(older))
    code, out, err = run_cli(["table", new], capsys)
    assert code == 0 and out.count("| **10.92** |") == 2
    # named on its own, it is not taken for a record
    code, out, err = run_cli(["table", str(report)], capsys)
    assert code == 2 and "a report of scca-eval compare --json, not a result record" in err


@pytest.mark.parametrize("where", ["missing folder", "folder"])
def test_a_job_summary_that_cannot_be_written_is_bad_input_not_a_failed_gate(sides, tmp_path, capsys,
                                                                              monkeypatch, where):
    base, new = sides([1.0] * N_DOCS)
    summary = tmp_path / "no-such-folder" / "summary.md" if where == "missing folder" else tmp_path
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, err = run_cli(["compare", base, new, "--max-regression", "1"], capsys)
    assert code == 2
    assert "**Gate passed**" in out  # the report is printed first
    assert err.count("\n") == 1 and f"GITHUB_STEP_SUMMARY={summary}" in err and "(the gate passed)" in err
