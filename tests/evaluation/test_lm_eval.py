"""``--protocol lm-eval`` against lm-evaluation-harness itself: the same tiny model, the same
local documents, lm-eval's HFLM running its own loglikelihood_rolling through a local task.
Per-document log-likelihoods must agree within 1e-6 relative, and so must word perplexity
and bits per byte."""

from __future__ import annotations

import math
import os

import pytest

from helpers import TASK_NAME, write_local_task

MAX_LENGTH = 48


def run_lm_eval(model, task_folder, *, max_length=MAX_LENGTH):
    """lm-eval's simple_evaluate on the local task; returns (per-document log-likelihoods in
    document order, the task's metrics)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(model, str):
        model_args = f"pretrained={model},max_length={max_length},device=cpu,dtype=float32"
        out = simple_evaluate(model="hf", model_args=model_args, tasks=[TASK_NAME], batch_size=1,
                              task_manager=TaskManager(include_path=str(task_folder)), log_samples=True)
    else:  # an lm-eval model object (the adapter)
        out = simple_evaluate(model=model, tasks=[TASK_NAME],
                              task_manager=TaskManager(include_path=str(task_folder)), log_samples=True)
    samples = sorted(out["samples"][TASK_NAME], key=lambda s: s["doc_id"])
    lls = [float(s["resps"][0][0]) if isinstance(s["resps"][0], list) else float(s["resps"][0]) for s in samples]
    return lls, out["results"][TASK_NAME]


def texts_of_several_lengths(tokenizer):
    """Documents shorter than a window, exactly one window, and ending in a short window."""
    from conftest import sample_slice

    alice = sample_slice("pg19_sample/carroll_alice.txt", 8000)
    arith = sample_slice("proof_pile_sample/coq_stdlib_arith.v", 4000)
    texts = [alice[:60], alice[1000:1900], arith[:1500], alice[3000:7000]]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    # Make one document exactly MAX_LENGTH tokens long.
    ids = tokenizer(arith[2000:], add_special_tokens=False).input_ids[:MAX_LENGTH]
    texts.append(tokenizer.decode(ids))
    lengths.append(len(tokenizer(texts[-1], add_special_tokens=False).input_ids))
    assert min(lengths) < MAX_LENGTH, lengths
    assert any(n % MAX_LENGTH and n > 2 * MAX_LENGTH for n in lengths), lengths
    assert MAX_LENGTH in lengths, lengths
    return texts


@pytest.fixture(scope="module")
def local_task(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = texts_of_several_lengths(tokenizer)
    folder, data = write_local_task(tmp_path_factory.mktemp("lm-eval-task"), texts)
    return folder, data, texts


def test_lm_eval_protocol_equals_lm_eval(tiny_model_dir, local_task):
    from scca_eval import evaluate

    folder, data, texts = local_task
    theirs, metrics = run_lm_eval(str(tiny_model_dir), folder)
    (record,) = evaluate(str(tiny_model_dir), data=[str(data)], ctx=MAX_LENGTH, protocol="lm-eval",
                         device="cpu", dtype="float32", batch_size=2)
    assert record["config"]["protocol"] == "lm-eval"
    ours = [-d["nll_sum"] for d in record["documents"]]
    assert len(ours) == len(theirs) == len(texts)
    for mine, lm_eval_value in zip(ours, theirs):
        assert mine == pytest.approx(lm_eval_value, rel=1e-6)
    # every token of every document is scored, the first after the prefix token
    assert record["metrics"]["tokens"] == sum(d["tokens"] for d in record["documents"])
    assert record["metrics"]["word_perplexity"] == pytest.approx(metrics["word_perplexity,none"], rel=1e-6)
    assert record["metrics"]["bits_per_byte"] == pytest.approx(metrics["bits_per_byte,none"], rel=1e-6)
    assert record["metrics"]["byte_perplexity"] == pytest.approx(metrics["byte_perplexity,none"], rel=1e-6)
    assert math.isfinite(record["metrics"]["perplexity"])


def test_lm_eval_command_under_a_pattern_equals_ppl(tiny_model_dir, local_task, tmp_path, capsys):
    """`scca-eval lm-eval --pattern longmixed -- --tasks <local task>`: lm-eval's own rolling
    log-likelihood through the adapter equals `ppl --protocol lm-eval` under the pattern, and
    differs from full attention (the pattern is really applied)."""
    import glob
    import json

    from scca_eval import evaluate
    from scca_eval.cli import main

    folder, data, texts = local_task
    out = tmp_path / "lm-eval-out"
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--model", str(tiny_model_dir), "--pattern", "longmixed", "--device", "cpu",
              "--dtype", "float32", "--max-length", str(MAX_LENGTH), "--", "--tasks", TASK_NAME,
              "--include_path", str(folder), "--batch_size", "4", "--log_samples", "--output_path", str(out)])
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err[-2000:]
    assert "batch size 4 → 1 under pattern longmixed" in captured.err
    (samples_file,) = glob.glob(str(out / "**" / f"samples_{TASK_NAME}_*.jsonl"), recursive=True)
    samples = sorted((json.loads(line) for line in open(samples_file, encoding="utf-8")), key=lambda s: s["doc_id"])
    theirs = [float(s["resps"][0][0]) for s in samples]

    kwargs = dict(data=[str(data)], ctx=MAX_LENGTH, protocol="lm-eval", device="cpu", dtype="float32")
    (patterned,) = evaluate(str(tiny_model_dir), pattern="longmixed", **kwargs)
    (full,) = evaluate(str(tiny_model_dir), **kwargs)
    ours = [-d["nll_sum"] for d in patterned["documents"]]
    assert len(ours) == len(theirs) == len(texts)
    for mine, lm_eval_value in zip(ours, theirs):
        assert mine == pytest.approx(lm_eval_value, rel=1e-6)
    assert patterned["metrics"]["nll_sum"] != pytest.approx(full["metrics"]["nll_sum"], rel=1e-4)


def test_generation_under_a_pattern_is_refused(tiny_model_dir):
    pytest.importorskip("lm_eval")
    from scca_eval.errors import UserError
    from scca_eval.evaluation.lm_eval_adapter import PatternLM

    lm = PatternLM(str(tiny_model_dir), "s2", device="cpu", dtype="float32")
    with pytest.raises(UserError, match="generation under pattern s2 is not supported"):
        lm.generate_until([])


@pytest.mark.parametrize("args,message", [
    (["--", "--model", "hf", "--tasks", "x"], "give --model as scca-eval's option"),
    (["--", "--limit", "3"], "no lm-eval tasks"),
    (["--pattern", "nonsense", "--", "--tasks", "x"], "nonsense"),
])
def test_lm_eval_command_bad_input(args, message, capsys):
    pytest.importorskip("lm_eval")
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_unknown_task_is_one_line(tiny_model_dir, capsys):
    """lm-eval itself (not a stand-in) refuses the task name, with its own wording."""
    pytest.importorskip("lm_eval")
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--model", str(tiny_model_dir), "--device", "cpu", "--max-length", "64", "--",
              "--tasks", "nonexistent_task_x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "lm-eval has no task nonexistent_task_x" in err[0] and "--include_path" in err[0]


def test_without_device_lm_eval_gets_ours_not_its_cuda_default(monkeypatch):
    """lm-eval's own --device default is cuda:0 even on a machine without CUDA; the command
    always hands it scca-eval's choice (CUDA when there is one, else the CPU)."""
    pytest.importorskip("lm_eval")
    import sys

    import lm_eval.__main__
    import torch

    from scca_eval.cli import main

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--", "--tasks", "x"])
    assert exit_info.value.code in (0, None)
    (argv,) = seen
    assert argv[argv.index("--device") + 1] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_an_unreachable_hub_is_one_line_naming_the_offline_way(monkeypatch, capsys):
    """What datasets raises offline for a hub task (here raised by a stand-in for lm-eval's
    run, with the real message's wording) ends in one line, exit 2."""
    pytest.importorskip("lm_eval")
    import lm_eval.__main__

    from scca_eval.cli import main

    def offline():
        try:
            raise OSError("[Errno -3] Temporary failure in name resolution")
        except OSError as cause:
            raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub "
                                  "(LocalEntryNotFoundError)") from cause

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", offline)
    with pytest.raises(SystemExit) as exit_info:
        main(["lm-eval", "--", "--tasks", "wikitext"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "'EleutherAI/wikitext_document_level'" in err[0] and "--include_path" in err[0]

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: 1 / 0)  # any other failure is not hidden
    with pytest.raises(ZeroDivisionError):
        main(["lm-eval", "--", "--tasks", "wikitext"])
