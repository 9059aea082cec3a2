"""One version number, written once (``__version__`` in scca_eval/__init__.py): the build reads
it from there, `scca-eval --version` shows it, and every kind of record stores it with the
versions of the packages that computed the numbers. (The built wheel's own version is
checked in test_packaging.py.)"""

from __future__ import annotations

import json
import platform
import tomllib
from pathlib import Path

import peft
import torch
import transformers

import scca_eval
from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_the_build_reads_the_version_from_the_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "scca_eval.__version__"}


def test_version_option(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"scca-eval, version {scca_eval.__version__}"


def test_every_record_kind_stores_the_versions(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    expected = {"scca_eval": scca_eval.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version()}
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "-q"]
    evaluation = ["--data", str(sample_data_dir), "--ctx", "128", "--max-tokens", "256"]
    runs = {
        "ppl": ["ppl", *common, *evaluation, "--out", str(tmp_path / "ppl")],
        "ppl --protocol lm-eval": ["ppl", *common, *evaluation, "--protocol", "lm-eval",
                                   "--out", str(tmp_path / "lm-eval")],
        "ppl --protocol longlora": ["ppl", *common, *evaluation, "--protocol", "longlora",
                                    "--out", str(tmp_path / "longlora")],
        "sweep": ["sweep", *common, *evaluation, "--out", str(tmp_path / "sweep")],
        "passkey": ["passkey", *common, "--ctx", "192", "--trials", "1", "--depths", "1",
                    "--out", str(tmp_path / "passkey")],
        "finetune": ["finetune", *common, "--data", str(sample_data_dir), "--ctx", "64", "--steps", "1",
                     "--grad-accum", "1", "--out", str(tmp_path / "finetune")],
    }
    folders = {"ppl": "ppl", "ppl --protocol lm-eval": "lm-eval", "ppl --protocol longlora": "longlora",
               "sweep": "sweep", "passkey": "passkey"}
    for kind, argv in runs.items():
        code, _, err = run_cli(argv, capsys)
        assert code == 0, f"{kind}: {err}"
    for kind, folder in folders.items():
        files = sorted((tmp_path / folder).glob("*.json"))
        assert files, kind
        for path in files:
            assert json.loads(path.read_text(encoding="utf-8"))["config"]["versions"] == expected, f"{kind}: {path}"
    training = json.loads((tmp_path / "finetune" / "training.json").read_text(encoding="utf-8"))
    assert training["versions"] == expected

def test_peft_is_a_dependency_of_the_default_install():
    """Fine-tuning and --adapter need peft: it is in the default install, and the lora extra
    stays, empty, so that `pip install 'scca-eval[lora]'` still works."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "peft" in {Requirement(r).name for r in project["dependencies"]}
    assert project["optional-dependencies"]["lora"] == []
