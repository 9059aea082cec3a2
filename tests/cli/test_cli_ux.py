"""What a user sees of a run: the progress line and the grouped --help."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from scca_eval.cli.progress import RateAndTimeLeft, RichProgress


def _line(progress: RichProgress) -> str:
    console = progress._progress.console
    with console.capture() as capture:
        console.print(progress._progress.get_renderable())
    return capture.get()


def test_resumed_cell_reports_the_rate_of_the_work_done_here():
    """600,000 tokens read back from a progress file took no time in this run: the rate and
    the time left come from the 1,000 tokens scored in 10 s, not from 601,000."""
    clock = [0.0]
    progress = RichProgress(console=Console(file=io.StringIO()), get_time=lambda: clock[0])
    progress.begin("pg19_sample · longmixed · ctx 8192", 1_000_000, 600_000)
    task = progress._progress.tasks[0]
    assert RateAndTimeLeft().render(task).plain == "– tok/s eta –"
    clock[0] = 10.0
    progress.advance(1_000)
    assert RateAndTimeLeft().render(task).plain == "100 tok/s eta 1:06:30"  # 399,000 tokens at 100/s


def test_time_left_shows_after_the_first_batch_in_an_80_column_terminal():
    """One batch of an 8k window can take a minute on a CPU: the time left must show from the
    first batch on, and fit an 80-column terminal next to a long label."""
    clock = [0.0]
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    progress = RichProgress(console=console, get_time=lambda: clock[0])
    progress.begin("proof_pile_sample · 1/2 local + 1/2 cross(1) · ctx 8192", 1_160_000)
    clock[0] = 60.0
    progress.advance(8_191)
    line = _line(progress)
    assert "137 tok/s eta 2:20:37" in line  # (1,160,000 - 8,191) / (8,191 / 60 s) = 8,437 s
    assert max(len(row) for row in line.splitlines()) <= 80


@pytest.mark.parametrize("command", ["ppl", "sweep"])
def test_help_is_grouped_into_sections(command, capsys):
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    headings = ["What to evaluate:", "How it is measured:", "Where to write:", "Performance:"]
    positions = [out.index(heading) for heading in headings]
    assert positions == sorted(positions)
    # every option is listed once, and only --help is left for the last section
    listed = [name for line in out[positions[0]:].splitlines() if line.startswith("  -")
              for name in re.findall(r"--[a-z-]+", line.strip().split("  ")[0])]
    assert len(listed) == len(set(listed)) and "--max-tokens" in listed and "--batch-size" in listed
    other = out[out.index("Other options:"):]
    assert "--help" in other and other.count("--") == 1


def test_cost_line_before_a_long_cell(monkeypatch, tmp_path):
    """Tokens, windows and documents always; a time from the rate remembered for this device,
    model, pattern and ctx; on CPU above a few minutes, the hint to use --max-tokens."""
    from scca_eval.evaluation import cost

    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path))
    label = "pg19_sample · longmixed · ctx 8192"
    assert cost.estimate_line(label, 2_000, 1, 1, rate=None, on_cpu=True) is None  # a quick look: no line
    first = cost.estimate_line(label, 1_160_000, 142, 6, rate=None, on_cpu=True)
    assert first == (f"{label}: 1,160,000 tokens to score in 142 windows of 6 documents; the time left shows "
                     "after the first batch; for a quick look add --max-tokens 16384")
    assert cost.remembered_rate("cpu (x86_64, 2 threads)", "default", "longmixed", 8192) is None
    cost.remember_rate("cpu (x86_64, 2 threads)", "default", "longmixed", 8192, 200.0)
    rate = cost.remembered_rate("cpu (x86_64, 2 threads)", "default", "longmixed", 8192)
    assert rate == 200.0 and cost.remembered_rate("cpu (x86_64, 2 threads)", "default", "full", 8192) is None
    line = cost.estimate_line(label, 1_160_000, 142, 6, rate=rate, on_cpu=True)
    assert "about 1:36:40 at 200 tok/s (last run on this device)" in line and "--max-tokens" in line  # 5,800 s
    assert "--max-tokens" not in cost.estimate_line(label, 1_160_000, 142, 6, rate=100_000.0, on_cpu=False)


def test_a_budget_too_small_for_every_document_says_so_and_what_covers_all():
    from scca_eval.evaluation.cells import say_budget_coverage as _say_budget_coverage
    from scca_eval.evaluation.windows import limit_scored_tokens

    documents = [10_000] * 6
    notices = []
    _say_budget_coverage("pg19_sample · full · ctx 8192", documents, limit_scored_tokens(documents, 8192, 16_384),
                         8192, 16_384, notices.append)
    assert notices == ["pg19_sample · full · ctx 8192: --max-tokens 16,384 covers 2 of 6 documents (each gets at "
                       "least one whole window); --max-tokens 49,146 or more covers them all"]
    notices.clear()
    _say_budget_coverage("x", documents, limit_scored_tokens(documents, 8192, 49_146), 8192, 49_146, notices.append)
    assert notices == []  # the budget it names does cover them all


def test_an_error_before_the_first_cell_leaves_no_blank_line():
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    with pytest.raises(ValueError):
        with RichProgress(console=console):
            raise ValueError("bad data")
    assert buffer.getvalue() == ""


@pytest.mark.parametrize("args", [
    ["bench", "attention", "--json", "/proc/1/bench.json"],
    ["bench", "model", "--shape", "smollm2-135m", "--markdown", "/proc/1/bench.md"],
    ["patterns", "show", "s2", "--ctx", "64", "--png", "/proc/1/s2.png"],
    ["table", "results/smollm2-135m", "--output", "/proc/1/table.md"],
    ["tasks", "pack", "mixture", "--out", "/proc/1/mixture.tokens.xz"],
])
def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(args, capsys, monkeypatch):
    from pathlib import Path

    from scca_eval.cli import main

    if not Path("/proc/1").is_dir():
        pytest.skip("needs /proc")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""  # nothing was computed or drawn
    assert captured.err.count("\n") == 1 and "cannot write in /proc/1" in captured.err


def test_a_run_of_several_cells_says_its_total_before_the_first(monkeypatch, tmp_path):
    from scca_eval.evaluation import cost

    assert cost.run_line([(200_000, None)], on_cpu=True) is None  # one cell: its own line says it
    assert cost.run_line([(100, None), (200, None)], on_cpu=False) is None  # a quick run: nothing
    line = cost.run_line([(100_000, 100.0), (200_000, 200.0)], on_cpu=False)
    assert line == "this run: 2 cells, 300,000 tokens to score; about 0:33:20 in all (rates of earlier runs on this device)"
    partial = cost.run_line([(100_000, 100.0), (200_000, None)], on_cpu=True)
    assert partial.startswith("this run: 2 cells, 300,000 tokens to score; about 0:16:40 for the 1 cells")


def test_scored_tokens_before_a_cell_equal_what_the_cell_scores(tiny_model_dir, sample_data_dir):
    """The total said before a run is the sum of what its cells then score."""
    from transformers import AutoTokenizer

    from scca_eval import evaluate
    from scca_eval.evaluation.protocols import protocol_named
    from scca_eval.data import tokenize_task
    from scca_eval.validation import resolve_tasks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    (task,) = resolve_tasks(None, [str(sample_data_dir)])
    tokenized = tokenize_task(task, tokenizer)
    for protocol, max_tokens in (("stride", None), ("stride", 300), ("lm-eval", 300)):
        (record,) = evaluate(str(tiny_model_dir), data=[str(sample_data_dir)], ctx=[64], device="cpu",
                             max_tokens=max_tokens, protocol=protocol, notify=lambda line: None)
        assert protocol_named(protocol).scored_tokens(tokenized, 64, max_tokens) == record["metrics"]["tokens"]
