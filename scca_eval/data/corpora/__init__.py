"""Corpora built on the user's machine from pinned Debian packages (too large to ship).

A corpus has a recipe (``mixture.py``), a manifest committed with scca-eval
(``tasks/data/<name>_manifest.json``: every document's checksum and token count) and, once
built, a folder in the cache: ``<cache>/corpora/<name>/``, holding

- ``texts/<split>/<domain>/<document>.txt``: the texts, written by ``scca-eval tasks build``;
- ``<name>.tokens.xz``: the SmolLM2 token ids of every split in one file (``packed.py``),
  written by the build and by ``scca-eval tasks unpack FILE`` on a machine that gets the
  ids without the texts;
- ``debs/``: the downloaded packages, kept for a rebuild.

A task reads a corpus split through a source of type ``built`` (``corpus:``, ``split:``):
from the texts when they are there, else from the packed ids (for the tokenizer they were
made with).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError
from ...files import cache_root
from ..tasks import bundled_tasks_dir

CORPORA = ("mixture",)
SPLITS = ("train", "validation")


def check_corpus(name: str) -> str:
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}; the corpora are: {', '.join(CORPORA)}")
    return name


def corpus_dir(name: str) -> Path:
    return cache_root() / "corpora" / check_corpus(name)


def texts_dir(name: str, split: str | None = None) -> Path:
    folder = corpus_dir(name) / "texts"
    return folder / split if split is not None else folder


def packed_path(name: str) -> Path:
    return corpus_dir(name) / f"{name}.tokens.xz"


def manifest_path(name: str) -> Path:
    bundled = bundled_tasks_dir()
    if bundled is None:
        raise UserError("the bundled task files are missing; reinstall scca-eval")
    return bundled / "data" / f"{check_corpus(name)}_manifest.json"


def read_manifest(name: str) -> dict:
    """The committed manifest of a corpus (documents, checksums, token counts)."""
    path = manifest_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot be read ({error}); reinstall scca-eval") from None


def state(name: str) -> str:
    """'built' (texts here), 'imported' (token ids only) or 'not built'."""
    if texts_dir(name).is_dir():
        return "built"
    if packed_path(name).is_file():
        return "imported"
    return "not built"


def not_built_error(task_name: str, corpus: str) -> UserError:
    return UserError(f"{task_name} is not built on this machine: run 'scca-eval tasks build {corpus}' (downloads "
                     f"its Debian packages once), or import its token file with 'scca-eval tasks unpack FILE'")


def require_built(task) -> None:
    """Refuse, before any model is loaded, a task of a corpus this machine has neither built nor imported."""
    if task.source.type == "built" and state(task.source.corpus) == "not built":
        raise not_built_error(task.name, task.source.corpus)
