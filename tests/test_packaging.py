"""What `pip install` gets: the wheel and the source distribution built from this checkout
(`python -m build`, which builds the wheel from the sdist), checked against what git tracks.
Every package and module under scca_eval/ and every task and reference file is in the wheel,
and nothing else is; the sdist holds what the wheel is built from. (.ci/wheel_smoke.sh
installs the wheel into a fresh environment and runs every command.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import pytest

import scca_eval

REPO = Path(__file__).resolve().parents[1]
# The folders installed under another name (package-dir in pyproject.toml).
MAPPED = {"tasks": "scca_eval/tasks", "results/reference": "scca_eval/reference"}
# Tracked files there that are not installed: the scripts that made the bundled texts.
NOT_INSTALLED = ["tasks/data/*.py"]


def _tracked(*folders: str) -> set[str]:
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tracked files")
    result = subprocess.run(["git", "ls-files", "-z", "--", *folders], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    return {name for name in result.stdout.split("\0") if name}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return wheel, sdist


def _wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}


def _installed_name(tracked: str) -> str:
    for folder, package in MAPPED.items():
        if tracked.startswith(folder + "/"):
            return package + tracked[len(folder):]
    return tracked


def test_wheel_holds_every_package_and_module(dists):
    wheel, _ = dists
    files = _wheel_files(wheel)
    tracked = _tracked("scca_eval")
    packages = {str(PurePosixPath(name).parent) for name in tracked if name.endswith("/__init__.py")}
    in_wheel = {str(PurePosixPath(name).parent) for name in files if name.endswith("/__init__.py")}
    assert packages - in_wheel == set(), "packages missing from the wheel"
    modules = {name for name in tracked if name.endswith(".py")}
    assert modules - files == set(), "modules missing from the wheel"
    # A module in a folder without __init__.py would be missed by package discovery: the
    # module check above catches it, and this says why.
    for module in modules:
        assert str(PurePosixPath(module).parent) in packages, f"{module}: its folder has no __init__.py"


def test_wheel_holds_the_tracked_files_and_nothing_else(dists):
    wheel, _ = dists
    files = _wheel_files(wheel)
    metadata = {name for name in files if name.split("/")[0].endswith(".dist-info")}
    assert {name.split("/")[0] for name in metadata} == {f"scca_eval-{scca_eval.__version__}.dist-info"}
    tracked = _tracked("scca_eval", *MAPPED)
    shipped = {name for name in tracked if not any(fnmatch(name, pattern) for pattern in NOT_INSTALLED)}
    expected = {_installed_name(name) for name in shipped}
    assert expected - files == set(), "tracked files missing from the wheel"
    assert files - metadata - expected == set(), "files in the wheel that git does not track"
    # the bundled texts and their sources are among them (the check above is not vacuous)
    assert "scca_eval/tasks/data/SOURCES.md" in files and "scca_eval/reference/scca_paper_pg19.yaml" in files
    assert any(name.startswith("scca_eval/tasks/data/pg19_sample/") for name in files)


def test_wheel_metadata(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"scca_eval-{scca_eval.__version__}.dist-info/METADATA").decode()
    metadata = Parser().parsestr(text)
    assert metadata["Version"] == scca_eval.__version__
    requires = metadata.get_all("Requires-Dist")
    # peft unconditionally (fine-tuning and --adapter need it), not only under an extra
    assert any(r.startswith("peft") and "extra ==" not in r for r in requires), requires
    assert {"lora", "plot", "gguf", "dev"} <= set(metadata.get_all("Provides-Extra"))


def test_sdist_holds_what_the_wheel_is_built_from(dists):
    _, sdist = dists
    root = f"scca_eval-{scca_eval.__version__}/"
    with tarfile.open(sdist) as archive:
        files = {member.name.removeprefix(root) for member in archive.getmembers() if member.isfile()}
    needed = _tracked("scca_eval", *MAPPED) | {"README.md", "pyproject.toml", "setup.py", "MANIFEST.in"}
    assert needed - files == set(), "files missing from the sdist"
    generated = {name for name in files if name.startswith("scca_eval.egg-info/")} | {"PKG-INFO", "setup.cfg"}
    assert files - needed - generated == set(), "files in the sdist that git does not track"
    assert "tasks/data/build_training_sample.py" in files
