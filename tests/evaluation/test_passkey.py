"""Passkey retrieval: the prompts, the one-pass scoring against transformers' greedy
``generate``, the records, the CLI and its views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scca_eval.cli import main
from scca_eval.evaluation.passkey import (DESCRIPTION, QUESTION, PromptBuilder, Trial, information_line, make_trials,
                               score_trials)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def run(argv) -> int:
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


# ---------------------------------------------------------------- prompts

def test_prompts_fill_ctx_and_hide_the_key_at_the_drawn_depth(tiny):
    _, tokenizer = tiny
    builder = PromptBuilder(tokenizer)
    trials = make_trials(builder, 300, trials=3, depths=4, seed=7)
    assert len(trials) == 12
    for trial in trials:
        assert len(trial.ids) == 300
        assert len(trial.key) == 5 and trial.key.isdigit()
        # What the model reads: description, filler, the key line, filler, question, key.
        text = tokenizer.decode(trial.ids.tolist())
        assert text.startswith(DESCRIPTION)
        assert information_line(trial.key) in text
        assert text.endswith(QUESTION + " " + trial.key)
        assert tokenizer.decode(trial.answer.tolist()).strip() == trial.key
        # The key line starts where the record says, after the drawn share of the filler.
        line_start = tokenizer.decode(trial.ids[trial.key_position:].tolist())
        assert line_start.lstrip("\n").startswith(information_line(trial.key))
        assert trial.bucket / 4 - 0.01 <= trial.depth <= (trial.bucket + 1) / 4 + 0.01
    assert len({t.key for t in trials}) > 1


def test_one_builder_makes_prompts_of_growing_length(tiny):
    _, tokenizer = tiny
    builder = PromptBuilder(tokenizer)
    for ctx in (256, 1024, 8192, 300):
        trial = builder.build(ctx, "12345", 0.5)
        assert len(trial.ids) == ctx
        assert tokenizer.decode(trial.ids.tolist()).count(information_line("12345")) == 1


def test_trials_are_seeded_and_shared_between_runs(tiny):
    _, tokenizer = tiny
    first = make_trials(PromptBuilder(tokenizer), 256, trials=2, depths=2, seed=1)
    again = make_trials(PromptBuilder(tokenizer), 256, trials=2, depths=2, seed=1)
    other = make_trials(PromptBuilder(tokenizer), 256, trials=2, depths=2, seed=2)
    assert [t.ids.tolist() for t in first] == [t.ids.tolist() for t in again]
    assert [t.key for t in first] != [t.key for t in other]
    # More trials keep the earlier ones.
    more = make_trials(PromptBuilder(tokenizer), 256, trials=3, depths=2, seed=1)
    assert [t.key for t in more if t.number < 2] == [t.key for t in first]


def test_too_short_ctx_is_refused_with_the_length_needed(tiny):
    from scca_eval.errors import UserError

    _, tokenizer = tiny
    builder = PromptBuilder(tokenizer)
    need = builder.minimum_ctx(4)
    make_trials(builder, need, trials=1, depths=4, seed=0)
    with pytest.raises(UserError, match=f"at least {need} tokens"):
        make_trials(builder, need - 1, trials=1, depths=4, seed=0)


# ---------------------------------------------------------------- one pass == greedy generate

def _generate(model, trial: Trial) -> np.ndarray:
    prompt = torch.from_numpy(trial.ids[: trial.answer_start]).unsqueeze(0)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(trial.answer),
                         do_sample=False, num_beams=1, pad_token_id=0)
    return out[0, trial.answer_start:].numpy()


def _with_answer(trial: Trial, answer: np.ndarray) -> Trial:
    ids = np.concatenate([trial.ids[: trial.answer_start], answer])
    return Trial(trial.ctx, trial.bucket, trial.number, trial.key, trial.depth, trial.key_position,
                 trial.answer_start, ids)


def test_one_pass_verdict_equals_greedy_generate_tiny_model(tiny):
    """A random model never says the key, so both verdicts would agree trivially. Instead the
    targets are made from generate's own output: its greedy tokens must be judged right, and
    the same tokens with one of them changed must be judged wrong, with the argmax tokens up
    to the change equal to generate's."""
    model, tokenizer = tiny
    model = model.double()  # no near-ties between the cached and the full forward pass
    trials = make_trials(PromptBuilder(tokenizer), 200, trials=2, depths=2, seed=3)
    right, wrong = [], []
    for index, trial in enumerate(trials):
        greedy = _generate(model, trial)
        right.append(_with_answer(trial, greedy))
        changed = greedy.copy()
        position = index % len(changed)
        changed[position] = (changed[position] + 1) % model.config.vocab_size
        wrong.append((_with_answer(trial, changed), position, greedy))
    verdicts = score_trials(model, right, batch_size=3)
    assert all(v.correct for v in verdicts)
    assert all((v.predicted == v.trial.answer).all() for v in verdicts)
    for verdict, (_, position, greedy) in zip(score_trials(model, [w[0] for w in wrong], batch_size=2), wrong):
        assert not verdict.correct
        assert (verdict.predicted[: position + 1] == greedy[: position + 1]).all()


@pytest.mark.slow
def test_one_pass_verdict_equals_greedy_generate_default_model():
    """The real model: each trial's verdict, and its argmax tokens up to the first wrong one,
    must be generate's. SmolLM2 finds the key in short prompts, so half the trials ask for
    another key than the one hidden (the model then says the hidden one): both outcomes occur."""
    from scca_eval.models import load_model

    model, tokenizer = load_model("default", device="cpu")
    builder = PromptBuilder(tokenizer)
    trials = make_trials(builder, 256, trials=2, depths=3, seed=0)
    swapped = []
    for trial in trials:
        other = builder.build(trial.ctx, str(99999 - int(trial.key) + 10000), trial.depth)
        assert len(other.answer) == len(trial.answer)
        swapped.append(_with_answer(trial, other.answer))
    outcomes = []
    for verdict in score_trials(model, trials + swapped, batch_size=4):
        greedy = _generate(model, verdict.trial)
        outcomes.append(bool((greedy == verdict.trial.answer).all()))
        assert verdict.correct == outcomes[-1]
        wrong = np.flatnonzero(greedy != verdict.trial.answer)
        upto = wrong[0] + 1 if len(wrong) else len(greedy)
        assert (verdict.predicted[:upto] == greedy[:upto]).all()
    # The comparison means something only when both outcomes occur.
    assert any(outcomes) and not all(outcomes), outcomes


# ---------------------------------------------------------------- command, records, views

@pytest.fixture(scope="module")
def passkey_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("passkey")
    argv = ["passkey", "--model", tiny_model_dir, "--pattern", "full,s2", "--ctx", "192,256", "--trials", "2",
            "--depths", "3", "--device", "cpu", "-q", "--out", out]
    assert run(argv) == 0
    return out, argv


def test_passkey_writes_one_record_per_pattern_and_ctx(passkey_run):
    out, _ = passkey_run
    files = sorted(p.name for p in out.glob("*.json"))
    assert len(files) == 4 and all("__passkey__" in name for name in files)
    record = json.loads((out / next(n for n in files if "__s2__ctx256" in n)).read_text())
    assert record["pattern"] == "s2" and record["ctx"] == 256 and record["task"] == "passkey"
    assert record["config"]["pattern"]["name"] == "s2"
    assert record["config"]["passkey"]["depths"] == 3
    trials = record["documents"]
    assert len(trials) == 6
    # The summary is the count of the trials' own verdicts.
    assert record["metrics"]["correct"] == sum(t["correct"] for t in trials)
    for depth in record["metrics"]["by_depth"]:
        members = [t for t in trials if t["bucket"] == depth["bucket"]]
        assert depth["trials"] == 2 and depth["correct"] == sum(t["correct"] for t in members)
        assert all(depth["depth_from"] - 0.01 <= t["depth"] <= depth["depth_to"] + 0.01 for t in members)
    # Every pattern answers the same prompts.
    full = json.loads((out / next(n for n in files if "__full__ctx256" in n)).read_text())
    assert [t["key"] for t in full["documents"]] == [t["key"] for t in trials]


def test_passkey_run_again_reuses_its_records(passkey_run, capsys):
    out, argv = passkey_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert run([a for a in argv if a != "-q"]) == 0
    assert "have" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.json")} == before


def test_passkey_and_perplexity_records_share_schema_and_tokenizer_fingerprint(passkey_run, tiny_model_dir,
                                                                             sample_data_dir, tmp_path):
    """One schema and one tokenizer fingerprint for both kinds: the passkey record names its
    tokenizer as a ppl record made with the same tokenizer and BOS setting does."""
    from transformers import AutoTokenizer

    from scca_eval.data.tokens import tokenizer_fingerprint
    from scca_eval.records import SCHEMA

    out, _ = passkey_run
    passkey = json.loads(next(out.glob("*__full__ctx256*.json")).read_text())
    assert run(["ppl", "--model", tiny_model_dir, "--data", sample_data_dir, "--ctx", "64", "--max-tokens", "256",
                "--device", "cpu", "-q", "--out", tmp_path]) == 0
    (ppl,) = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert passkey["schema"] == ppl["schema"] == SCHEMA
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert PromptBuilder(tokenizer).head[0] != tokenizer.bos_token_id  # prompts without BOS, as ppl without --bos
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert passkey["config"]["tokenizer_fingerprint"] == ppl["config"]["tokenizer_fingerprint"] == fingerprint
    assert passkey["config"]["model"]["tokenizer"]["fingerprint"] == ppl["config"]["model"]["tokenizer"]["fingerprint"] \
        == fingerprint


def test_passkey_fingerprint_counts_the_bos_its_prompts_start_with(tiny, tiny_model_dir):
    """A tokenizer that adds BOS on its own starts every passkey prompt with it: the record's
    fingerprint is then the one of ppl --bos (ids that start with BOS), not that of plain ppl."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from scca_eval.data.tokens import tokenizer_fingerprint
    from scca_eval.patterns.parse import resolve_pattern
    from scca_eval.records import passkey_config

    model, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    assert PromptBuilder(tokenizer).head[0] == bos
    config = passkey_config(model, tokenizer, resolve_pattern("full"), {})
    assert config["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer, add_bos=True)
    assert config["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer, add_bos=False)


def test_table_and_plot_show_passkey_records(passkey_run, tmp_path, capsys):
    out, _ = passkey_run
    assert run(["table", out]) == 0
    text = capsys.readouterr().out
    assert "**passkey**" in text and "| full |" in text and "| s2 |" in text
    assert "**passkey · s2**" in text and "| 0–33% |" in text
    assert run(["table", out, "--format", "csv", "-o", tmp_path / "p.csv"]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "model,pattern,ctx,depth_from,depth_to,correct,trials,accuracy"
    assert len(rows) == 1 + 4 * (1 + 3)
    pytest.importorskip("matplotlib")
    assert run(["plot", out, "--out", tmp_path / "heat"]) == 0
    assert (tmp_path / "heat.png").stat().st_size > 0 and (tmp_path / "heat.svg").stat().st_size > 0


def test_records_of_other_adapters_are_rows_of_their_own(passkey_run):
    """Checkpoints evaluated under one pattern: a row per adapter, labelled by it, not a refusal."""
    from scca_eval.report.passkey import passkey_rows, passkey_tables

    out, _ = passkey_run
    full = [json.loads(p.read_text()) for p in sorted(out.glob("*full*.json"))]
    tuned = json.loads(json.dumps(full))
    for record in tuned:
        record["config"]["model"]["adapter"] = {"path": "ckpt/s2", "training_pattern": "s2"}
    rows = passkey_rows(full + tuned)
    assert [row.label for row in rows] == ["full · adapter s2 · trained under s2", "full · no adapter"]
    assert all(len(row.records) == len(full) for row in rows)
    assert "| full · adapter s2 · trained under s2 |" in passkey_tables(full + tuned)
    assert "full · adapter s2 · trained under s2" in passkey_tables(full + tuned, format="csv")


@pytest.mark.parametrize("extra, fragment", [
    (["--trials", "0"], "--trials"),
    (["--depths", "0"], "--depths"),
    (["--ctx", "40"], "too short"),
    (["--ctx", "4096"], "--allow-long-context"),
    (["--pattern", "s3"], "unknown pattern"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_passkey_bad_input(tiny_model_dir, tmp_path, capsys, extra, fragment):
    argv = ["passkey", "--model", tiny_model_dir, "--ctx", "192", "--trials", "1", "--depths", "2",
            "--device", "cpu", "-q", "--out", tmp_path / "out", *extra]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_passkey_records_refused_where_they_do_not_fit(passkey_run, tmp_path, capsys):
    out, _ = passkey_run
    for argv, fragment in ((["compare", out, out], "perplexity records"),
                           (["table", out, "--format", "latex"], "markdown or csv")):
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0]


def test_plot_draws_passkey_heat_maps_beside_perplexity_rows(passkey_run, tmp_path, capsys):
    """Passkey records and published rows from one command: the published rows under PREFIX,
    the heat maps under PREFIX-passkey, with every text inside each picture and the colour
    bar in the percent the cells show."""
    from scca_eval.report.passkey import heatmap_figure
    from scca_eval.report.plot import text_outside
    from scca_eval.records import load_records

    pytest.importorskip("matplotlib")
    out, _ = passkey_run
    assert run(["plot", out, "--reference", "scca_paper_pg19", "--out", tmp_path / "x"]) == 0
    assert sorted(p.name for p in tmp_path.glob("x*")) == ["x-passkey.png", "x-passkey.svg", "x.png", "x.svg"]
    figure = heatmap_figure(load_records([out]))
    assert text_outside(figure) == []
    colour_bar = figure.axes[-1]
    assert colour_bar.get_ylim() == (0.0, 100.0) and "%" in colour_bar.get_ylabel()


def test_heads_that_never_reach_the_key_cannot_answer(tiny_model_dir):
    """Under all-`local` heads the answer's chunk never attends to an earlier chunk, so a key
    hidden there cannot change the answer's logits (it fails by construction); under full
    attention it does."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from scca_eval.attention.register import apply_pattern
    from scca_eval.patterns.parse import resolve_pattern

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_model_dir))
    first = builder.build(256, "12345", 0.1)
    second = builder.build(256, "67890", 0.1)
    # Same answer tokens, prompts that differ only in the key line, far before the last chunk.
    second = _with_answer(second, first.answer)
    differ = np.flatnonzero(first.ids != second.ids)
    assert len(differ) and differ.max() < 3 * 256 // 4

    def answer_logits(trial):
        ids = torch.from_numpy(trial.ids).unsqueeze(0)
        with torch.inference_mode():
            return model(input_ids=ids, logits_to_keep=len(trial.answer) + 1).logits

    assert not torch.allclose(answer_logits(first), answer_logits(second))
    apply_pattern(model, resolve_pattern("local"))
    assert torch.equal(answer_logits(first), answer_logits(second))


def test_committed_passkey_results_match_their_command_and_findings():
    """results/passkey/README.md: its commands parse, the committed records are what its
    passkey command makes (one per pattern and ctx; trials, depths, seed, dtype, device),
    and its findings table states each record's count in the row of its pattern and the
    column of its ctx."""
    import re
    import shlex

    from scca_eval.cli import cli
    from scca_eval.records import load_records

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "results" / "passkey" / "README.md").read_text(encoding="utf-8")
    block = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0].replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.strip().startswith("scca-eval ")]
    for name, *args in commands:
        with cli.get_command(None, name).make_context(name, list(args)) as context:
            if name == "passkey":
                options = context.params
    records = load_records([repo / options["out"]])
    asked = [name for value in options["patterns"] for name in value.split(",")]
    ctxs = list(options["ctx"])
    cells = sorted((r["pattern"], r["ctx"]) for r in records if not r["pattern"].startswith("custom"))
    assert cells == sorted((p, c) for p in asked if p != "local" for c in ctxs)
    assert len(records) == len(asked) * len(ctxs) and len({(r["pattern"], r["ctx"]) for r in records}) == len(records)
    header = re.search(r"^\| pattern \|((?: \d+ \|)+)", readme, flags=re.M)
    assert header and [int(c) for c in header[1].split("|") if c.strip()] == ctxs
    for record in records:
        assert record["config"]["dtype"] == options["dtype"]
        assert record["config"]["model"]["device"].split(":")[0] == options["device"]
        assert record["config"]["passkey"]["trials_per_depth"] == options["trials"]
        assert record["config"]["passkey"]["depths"] == options["depths"]
        assert record["config"]["passkey"]["seed"] == options["seed"]
        name = "local (control)" if record["pattern"].startswith("custom") else record["pattern"]
        row = re.search(rf"^\| {re.escape(name)} \|((?: \d+/\d+ \|)+)", readme, flags=re.M)
        assert row, f"no findings row for {name}"
        counts = [tuple(map(int, c.split("/"))) for c in row[1].split("|") if c.strip()]
        assert len(counts) == len(ctxs), f"findings row of {name} has {len(counts)} counts for {len(ctxs)} ctx"
        stated = counts[ctxs.index(record["ctx"])]
        assert stated == (record["metrics"]["correct"], record["metrics"]["trials"])
