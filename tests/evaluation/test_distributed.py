"""Data parallel evaluation: two CPU processes (gloo, started through torchrun's own code)
write the same record as one process, and the sharding scores every window exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import launch_two_processes

from scca_eval import distributed
from scca_eval.evaluation.cells import engine_batches as _engine_batches, plan_groups as _plan_groups
from scca_eval.distributed import Ranks
from scca_eval.evaluation.windows import plan_windows


def ppl_args(model_dir, data_dir, out):
    # Overlapping windows (stride < ctx), several batches per group and several groups, so
    # the ranks really share the batches of every group.
    return ["ppl", "--model", str(model_dir), "--data", str(data_dir), "--ctx", "48", "--stride", "24",
            "--batch-size", "3", "--save-every", "4", "--device", "cpu", "-q", "--out", str(out)]


def test_each_window_is_scored_by_exactly_one_rank_in_whole_engine_batches():
    windows = plan_windows([700, 3, 150, 1, 420, 96], ctx=48, stride=24)
    for world in (1, 2, 3, 5):
        for group in _plan_groups(windows, target_tokens=4 * 3 * 48):
            group_windows = [windows[i] for i in group]
            batches = _engine_batches(group_windows, 3)
            shares = [distributed.my_batches(batches, Ranks(rank, world)) for rank in range(world)]
            flat = sorted(i for share in shares for i in share)
            assert flat == list(range(len(group_windows)))  # all windows, none twice
            for rank, share in enumerate(shares):
                # The engine cuts a rank's windows into exactly the batches the rank was given.
                own = [group_windows[i] for i in share]
                expected = [[share.index(i) for i in batch] for batch in batches[rank::world]]
                assert sorted(_engine_batches(own, 3)) == sorted(expected)


def test_groups_cut_long_documents_and_resume_forms_the_same_groups():
    windows = plan_windows([700, 150, 420, 96, 260], ctx=48, stride=24)
    groups = _plan_groups(windows, target_tokens=300)
    assert [i for g in groups for i in g] == list(range(len(windows)))
    work = [sum(windows[i].end - windows[i].start for i in g) for g in groups]
    assert all(w >= 300 for w in work[:-1])                        # each closed once it holds the target
    assert all(w - (windows[g[-1]].end - windows[g[-1]].start) < 300 for w, g in zip(work, groups))  # not later
    assert any(len({windows[i].doc for i in g}) == 1 and windows[g[-1]].doc == windows[groups[k + 1][0]].doc
               for k, g in enumerate(groups[:-1]))                   # the 700-token document is cut
    # Resuming after any group: the remaining windows form the remaining groups.
    for k in range(1, len(groups)):
        rest = windows[groups[k][0]:]
        again = _plan_groups(rest, target_tokens=300)
        assert [[rest[i] for i in g] for g in again] == [[windows[i] for i in g] for g in groups[k:]]


def test_one_process_needs_no_process_group():
    assert distributed.current() == distributed.SINGLE
    values = [1.5, 2.5]
    assert distributed.sum_over_ranks(values, distributed.SINGLE) is values
    assert distributed.all_agree(False, distributed.SINGLE) is False


def test_two_gloo_processes_write_the_record_of_one_process(tiny_model_dir, sample_data_dir, tmp_path):
    from scca_eval.cli import main

    single, double = tmp_path / "one", tmp_path / "two"
    with pytest.raises(SystemExit) as exit_info:
        main(ppl_args(tiny_model_dir, sample_data_dir, single))
    assert exit_info.value.code == 0

    done = launch_two_processes(ppl_args(tiny_model_dir, sample_data_dir, double), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Rank 0 alone prints the table and writes the record.
    assert done.stdout.count("| pattern |") == 1
    files = sorted(p.name for p in double.iterdir())
    assert files == sorted(p.name for p in single.iterdir()) and len(files) == 1

    one = json.loads((single / files[0]).read_text())
    two = json.loads((double / files[0]).read_text())
    assert two["runtime"]["processes"] == 2 and "gloo" in two["runtime"]["device"]
    assert one["runtime"]["processes"] == 1
    # Same windows in the same batches, per-window sums exchanged exactly: the per-document
    # float64 sums and every metric are equal bit for bit (the documented tolerance is 0 on CPU).
    assert two["documents"] == one["documents"]
    assert two["metrics"] == one["metrics"]
    assert sum(d["tokens"] for d in one["documents"]) == sum(
        len(d) - 1 for d in _token_counts(tiny_model_dir, sample_data_dir))


@pytest.mark.parametrize("rank_zero_delay", [0.0, 3.0], ids=["together", "rank-0-late"])
def test_bad_input_under_torchrun_is_one_line_and_status_2(tiny_model_dir, tmp_path, rank_zero_delay):
    # rank-0-late: the quiet rank meets the error first; it must not end the launch before
    # rank 0 has said the line.
    args = ["ppl", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nowhere"), "--device", "cpu", "-q"]
    done = launch_two_processes(args, tmp_path, rank_zero_delay=rank_zero_delay)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file or folder" in lines[0] and "Traceback" not in done.stderr


def _token_counts(model_dir, data_dir):
    """Every document's token ids, tokenized here independently of the run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
            for p in sorted(Path(data_dir).glob("*.txt"))]
