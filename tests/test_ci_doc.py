"""docs/ci.md works when copied as it is: its install target is one pip accepts from the
repository, and its commands (baseline, evaluation, gate) run and pass on an unchanged
checkpoint. The model is swapped for the tiny test model, everything else is the page's."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PAGE = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE, flags=re.S)


def _workflow() -> dict:
    (workflow,) = _blocks("yaml")
    return yaml.safe_load(workflow)


def _step(workflow: dict, name: str) -> str:
    (step,) = [s for s in workflow["jobs"]["perplexity"]["steps"] if s.get("name") == name]
    return step["run"]


def _expand(command: str, env: dict) -> list[str]:
    """A shell command line as bash would split it, with $VAR and "$VAR" expanded."""
    command = command.replace("\\\n", " ")
    command = re.sub(r'"\$(\w+)"', lambda m: shlex.quote(env[m.group(1)]), command)
    command = re.sub(r"\$(\w+)", lambda m: env[m.group(1)], command)
    return shlex.split(command)


def test_install_target_is_the_repository_as_pip_reads_it(tmp_path):
    """`pip install "$SCCA_EVAL"` from the repository root resolves to this package (a dry run:
    nothing is downloaded or installed)."""
    target = _workflow()["env"]["SCCA_EVAL"]
    install = _step(_workflow(), "Install scca-eval (CPU build of torch)")
    assert 'pip install "$SCCA_EVAL"' in install
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
         "--quiet", "--report", str(report), target],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "scca-eval"
    assert "gguf" in item.get("requested_extras", [])


def test_the_pages_commands_run_and_the_gate_passes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from scca_eval.cli import main

    workflow = _workflow()
    env = {key: str(value) for key, value in workflow["env"].items()}
    env["MODEL"] = str(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)

    baseline = next(line for block in _blocks("bash") for line in [block] if "scca-eval ppl" in block)
    baseline = baseline.split("\ngit add")[0]
    commands = [_expand(baseline, env),
                _expand(_step(workflow, "Evaluate the checkpoint"), env),
                _expand(_step(workflow, "Gate on the baseline"), env)]
    commands[0][commands[0].index("--model") + 1] = str(tiny_model_dir)  # step 1 names `default`
    for command in commands:
        assert command[0] == "scca-eval"
        with pytest.raises(SystemExit) as exit_info:
            main(command[1:])
        assert exit_info.value.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "**Gate passed**" in out
    assert (tmp_path / "comparison.md").read_text().strip() in out
    assert len(list((tmp_path / "results" / "baseline").glob("*.json"))) == 8
    assert len(list((tmp_path / "new").glob("*.json"))) == 8
