"""results/finetune-smollm2-16k/reproduce.sh: its speed switches reach `scca-eval finetune` as
options that command accepts, and contradictory or unknown values stop it before anything runs."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from scca_eval.cli import cli

SCRIPT = Path(__file__).resolve().parents[2] / "results" / "finetune-smollm2-16k" / "reproduce.sh"

# Stands in for python: writes its arguments to args.txt beside the run's --out folder and the
# training.json the script copies, so the finetune stage runs to its end without training.
RECORDER = f"""#!{sys.executable}
import pathlib, shlex, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
(out / "training.json").write_text("{{}}")
(out.parent / (out.name + ".args.txt")).write_text(shlex.join(args))
"""


def run_script(tmp_path, **env):
    recorder = tmp_path / "recorder"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    results = tmp_path / "results"
    full_env = {**os.environ, "PYTHON": str(recorder), "RESULTS": str(results), **env}
    for name in ("COMPILE", "CHECKPOINTING", "CUDA_GRAPHS"):
        if name not in env:
            full_env.pop(name, None)
    done = subprocess.run(["bash", str(SCRIPT), "finetune"], env=full_env, capture_output=True, text=True,
                          timeout=60)
    return done, results


def finetune_args(results, pattern):
    args = shlex.split((results / "checkpoints" / f"{pattern}.args.txt").read_text())
    assert args[:3] == ["-m", "scca_eval", "finetune"]
    return args[3:]


def test_cuda_graphs_trains_compiled_without_checkpointing_every_pattern(tmp_path):
    done, results = run_script(tmp_path, CUDA_GRAPHS="1")
    assert done.returncode == 0, done.stderr
    for pattern in ("full", "s2", "scca_fixed", "scca_flow", "sda", "longmixed"):
        args = finetune_args(results, pattern)
        assert {"--cuda-graphs", "--compile", "--no-gradient-checkpointing"} <= set(args)
        assert args[args.index("--offload-activations") + 1] == "off"
        assert args[args.index("--pattern") + 1] == pattern
        with cli.get_command(None, "finetune").make_context("finetune", list(args)):
            pass  # every option is one finetune takes
        assert (results / "training" / f"{pattern}.json").is_file()


def test_the_default_keeps_the_committed_recipe(tmp_path):
    """The committed runs' step (checkpointed, eager), named, since finetune's own default is auto."""
    done, results = run_script(tmp_path)
    assert done.returncode == 0, done.stderr
    args = finetune_args(results, "sda")
    assert "--gradient-checkpointing" in args
    assert not {"--cuda-graphs", "--compile", "--no-gradient-checkpointing", "--offload-activations"} & set(args)
    with cli.get_command(None, "finetune").make_context("finetune", list(args)) as context:
        assert context.params["gradient_checkpointing"] is True


def test_without_checkpointing_and_without_cuda_graphs_says_so(tmp_path):
    """CHECKPOINTING=0 alone keeps the step it names: finetune's auto must not add CUDA graphs."""
    done, results = run_script(tmp_path, CHECKPOINTING="0", COMPILE="1")
    assert done.returncode == 0, done.stderr
    args = finetune_args(results, "s2")
    assert {"--no-gradient-checkpointing", "--no-cuda-graphs", "--compile"} <= set(args)
    with cli.get_command(None, "finetune").make_context("finetune", list(args)) as context:
        assert context.params["cuda_graphs"] is False


def test_contradictory_or_unknown_switches_stop_before_anything_runs(tmp_path):
    for env, says in (({"CUDA_GRAPHS": "1", "CHECKPOINTING": "1"}, "without gradient checkpointing"),
                      ({"CUDA_GRAPHS": "yes"}, "CUDA_GRAPHS must be 0 or 1"),
                      ({"CHECKPOINTING": "2"}, "CHECKPOINTING must be 0 or 1")):
        done, results = run_script(tmp_path, **env)
        assert done.returncode == 2 and says in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not results.exists()
