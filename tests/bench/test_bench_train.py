"""`scca-eval bench train` on CPU: the baseline loop and the finetune step do the same work."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from scca_eval.cli.bench import bench

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320}


def test_bench_train_baseline_and_finetune_agree(tmp_path):
    config, out = tmp_path / "tiny.json", tmp_path / "train.json"
    config.write_text(json.dumps(TINY))
    result = CliRunner().invoke(bench, ["train", "--shape", str(config), "--ctx", "48", "--pattern", "full,s2",
                                        "--steps", "2", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(row["path"], row["pattern"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("baseline", "full"), ("finetune", "full"), ("finetune", "s2")}
    assert all(row["error"] is None and len(row["times_s"]) == 2 for row in rows.values())
    # Same weights, same window, full attention: the first step's loss is the same computation
    # (every cell starts from the same weights, whatever the cells before it trained).
    assert rows["finetune", "full"]["first_loss"] == pytest.approx(rows["baseline", "full"]["first_loss"], rel=1e-5)
    assert rows["finetune", "s2"]["first_loss"] != pytest.approx(rows["finetune", "full"]["first_loss"], rel=1e-6)
    assert rows["finetune", "full"]["speed_vs_baseline"] > 0
    assert rows["finetune", "s2"]["goal_vs_full"] > 1
    # auto's choice is shown beside it: on a CPU, the chunked kernel
    assert rows["finetune", "s2"]["kernel"] == "chunked" and rows["finetune", "full"]["kernel"] == "sdpa"
    assert "| 48 | finetune | s2 | auto (chunked) |" in result.output
    # off a GPU there is nowhere to offload to: no "GPU" or "host" placement is claimed
    assert "| 48 | finetune | s2 | auto (chunked) |  |" in result.output and "activations on the" not in result.output


def test_bench_train_times_each_backend_on_the_same_work(tmp_path):
    config, out = tmp_path / "tiny.json", tmp_path / "train.json"
    config.write_text(json.dumps(TINY))
    result = CliRunner().invoke(bench, ["train", "--shape", str(config), "--ctx", "40", "--pattern", "full,longmixed",
                                        "--backend", "packed,chunked", "--no-baseline", "--steps", "1",
                                        "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {(row["pattern"], row["backend"]): row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("full", "sdpa"), ("longmixed", "packed"), ("longmixed", "chunked")}
    assert [rows[case]["kernel"] for case in sorted(rows)] == ["sdpa", "chunked", "packed"]  # as asked
    # the same pattern on two kernels: the same loss (each cell starts from the same weights)
    assert rows["longmixed", "packed"]["first_loss"] == pytest.approx(rows["longmixed", "chunked"]["first_loss"],
                                                                      rel=1e-5)
    assert rows["longmixed", "packed"]["activations"] == {"setting": "auto", "offloaded": False}  # CPU: nothing to do


def test_bench_train_profiles_one_more_step_per_cell(tmp_path):
    """--profile: each cell's op table in the folder, and the profiled step's host time (the
    whole step on a CPU, so about as long as a timed step) in the row and the table."""
    config, out, folder = tmp_path / "tiny.json", tmp_path / "train.json", tmp_path / "profiles"
    config.write_text(json.dumps(TINY))
    result = CliRunner().invoke(bench, ["train", "--shape", str(config), "--ctx", "40", "--pattern", "full,s2",
                                        "--no-baseline", "--steps", "3", "--warmup", "1", "--device", "cpu",
                                        "--profile", str(folder), "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["pattern"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(path.name for path in folder.iterdir()) == ["40-finetune-full-sdpa.txt", "40-finetune-s2-auto.txt"]
    for label, row in rows.items():
        profiled = row["profile"]
        assert profiled["gpu_ms"] is None  # no GPU to measure
        # against the fastest and slowest timed step: one step slowed by the machine is not a failure
        assert 0.2 * 1000 * min(row["times_s"]) < profiled["host_ms"] < 5 * 1000 * max(row["times_s"])
        assert "aten::mm" in (folder / profiled["table"]).read_text()
    assert "| host ms | GPU ms |" in result.output
    assert not list(folder.glob("*.partial"))


def test_bench_train_profile_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    from helpers import run_cli

    config, blocker = tmp_path / "tiny.json", tmp_path / "a-file"
    config.write_text(json.dumps(TINY))
    blocker.write_text("")
    code, out, err = run_cli(["bench", "train", "--shape", str(config), "--ctx", "40", "--pattern", "full",
                              "--no-baseline", "--device", "cpu", "--profile", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot make the profile folder" in err and len(err.strip().splitlines()) == 1, err


def test_bench_train_without_checkpointing_runs_each_layer_once_a_step(tmp_path, monkeypatch):
    """--no-gradient-checkpointing: a decoder layer's attention runs once a step instead of
    twice (no recomputation in the backward pass), in the baseline and the finetune cells,
    and the step computes the same loss."""
    import scca_eval.bench.train as train_module

    calls = []
    build = train_module.random_model

    def counted_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.get_decoder().layers[0].self_attn.register_forward_pre_hook(lambda module, inputs: calls.append(1))
        return model

    monkeypatch.setattr(train_module, "random_model", counted_model)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    losses = {}
    for flag, per_step in (("--gradient-checkpointing", 2), ("--no-gradient-checkpointing", 1)):
        calls.clear()
        out = tmp_path / f"{flag}.json"
        result = CliRunner().invoke(bench, ["train", "--shape", str(config), "--ctx", "40", "--pattern", "full",
                                            "--steps", "2", "--warmup", "1", "--device", "cpu", flag,
                                            "--json", str(out), "--markdown", str(tmp_path / f"{flag}.md")])
        assert result.exit_code == 0, result.output
        data = json.loads(out.read_text())
        assert data["gradient_checkpointing"] is (per_step == 2)
        assert len(calls) == 2 * 3 * per_step  # two cells (baseline, finetune) of 1 + 2 steps
        losses[flag] = {row["path"]: row["first_loss"] for row in data["rows"]}
    assert losses["--no-gradient-checkpointing"] == pytest.approx(losses["--gradient-checkpointing"], rel=1e-5)
    assert "no gradient checkpointing" in (tmp_path / "--no-gradient-checkpointing.md").read_text()


def test_bench_train_compiled_cells_compile_before_their_timed_steps(tmp_path, monkeypatch):
    """--compile: a cell's first step runs eagerly and the next compiles, so with --warmup 1
    the warm-up covers both; no timed step compiles."""
    import time as real_time

    from torch._dynamo.utils import counters

    import scca_eval.bench.train as train_module

    compiled_during, started = [], []

    class Clock:  # the timed steps are the code between two perf_counter calls
        @staticmethod
        def perf_counter():
            graphs = counters["stats"].get("unique_graphs", 0)
            if started:
                compiled_during.append(graphs - started.pop())
            else:
                started.append(graphs)
            return real_time.perf_counter()

    monkeypatch.setattr(train_module, "time", Clock)
    config, out = tmp_path / "tiny.json", tmp_path / "train.json"
    config.write_text(json.dumps(TINY))
    torch._dynamo.reset()
    counters.clear()
    result = CliRunner().invoke(bench, ["train", "--shape", str(config), "--ctx", "40", "--pattern", "full",
                                        "--no-baseline", "--compile", "--steps", "2", "--warmup", "1",
                                        "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["rows"][0]["error"] is None
    assert counters["stats"].get("unique_graphs", 0) > 0  # it did compile
    assert compiled_during == [0, 0]
