"""Task definitions: YAML files that say where the documents come from and which to keep.

A task file is data, not code::

    name: proof_pile
    description: Proof-pile test split, long documents only
    source:                      # where the documents come from (see SOURCE_FIELDS)
      type: hub
      dataset: hoskinson-center/proof-pile
      data_files: test/proofpile_test.jsonl.gz
      split: test
      text_field: text
    selection:                   # optional: which documents to evaluate
      min_tokens: 32768          # keep documents of at least this many tokens
      sample: 50                 # then draw this many of them ...
      seed: 0                    # ... with this seed

Source types:

``text``
    ``path``: a text file (one document) or a folder (every non-hidden file under it is one
    document, in order of the relative path; ``glob`` narrows the files, default ``**/*``).
    A file whose name ends in ``.gz`` is decompressed (gzip); its document id leaves out
    the ``.gz``.
``jsonl``
    ``path``: a ``.jsonl`` / ``.jsonl.gz`` file or a folder of them; one record per line,
    the text in ``text_field`` (default ``text``), an optional ``id_field``.
``parquet``
    ``path``: a ``.parquet`` file or a folder of them; ``text_field``, ``id_field`` as above.
``hub``
    ``dataset`` (a dataset repository on the hub), ``split``, optional ``config``,
    ``revision``, ``data_files`` (files inside the repository, globs allowed: read with the
    parquet/json readers of ``datasets``, so repositories with loading scripts work too),
    ``text_field``, ``id_field``, ``streaming`` (default true).
``longlora_bin``
    ``path``: LongLoRA's pre-tokenized evaluation file, a flat stream of uint16 token ids
    (``pg19/test.bin``, ``proof-pile/test_sampled_data.bin``). It takes no selection.
``built``
    ``corpus`` (a corpus built into the cache by ``scca-eval tasks build CORPUS``, see
    ``corpora/``) and ``split``: its texts, one document per file, or, on a machine that has
    only its packed token ids (``scca-eval tasks unpack FILE``), those.

Optional fields for listings (``scca-eval tasks``): ``use``, what the task is for —
``evaluation`` (the default), ``training`` (fine-tuning text) or ``validation`` (held out
from a training task, to watch a fine-tune); evaluation commands say so once when given a
training or validation task. ``tokens``: the task's size in SmolLM2-135M tokens (the
bundled tasks' figures are checked by the tests).

Relative paths are relative to the YAML file. Selection, applied in this order:
``limit_documents`` (read only the first N documents of the source), ``min_tokens`` (keep
documents with at least N tokens, BOS not counted), ``sample`` (keep N of them: drawn
uniformly without replacement with ``seed`` when ``sample_method`` is ``random``, the
default, or the first N when it is ``first``; the kept documents stay in source order).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..files import bundled_folder

SOURCE_TYPES = ("text", "jsonl", "parquet", "hub", "longlora_bin", "built")

# Allowed fields per source type, with whether each is required.
SOURCE_FIELDS: dict[str, dict[str, bool]] = {
    "text": {"type": True, "path": True, "glob": False},
    "jsonl": {"type": True, "path": True, "text_field": False, "id_field": False},
    "parquet": {"type": True, "path": True, "text_field": False, "id_field": False},
    "hub": {"type": True, "dataset": True, "split": True, "config": False, "revision": False,
            "data_files": False, "text_field": False, "id_field": False, "streaming": False},
    "longlora_bin": {"type": True, "path": True},
    "built": {"type": True, "corpus": True, "split": True},
}
TOP_LEVEL_FIELDS = {"name": True, "description": False, "use": False, "tokens": False, "source": True,
                    "selection": False}
USES = ("evaluation", "training", "validation")
SELECTION_FIELDS = ("limit_documents", "min_tokens", "sample", "seed", "sample_method")
SAMPLE_METHODS = ("random", "first")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class SourceSpec:
    """Where a task's documents come from (see the module docstring for each type)."""

    type: str
    path: Path | None = None
    glob: str = "**/*"
    text_field: str = "text"
    id_field: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    data_files: tuple[str, ...] | None = None
    streaming: bool = True
    corpus: str | None = None

    def to_dict(self) -> dict:
        """The fields that apply to this source type, JSON-ready."""
        out = {}
        for key in SOURCE_FIELDS[self.type]:
            value = getattr(self, key)
            if isinstance(value, Path):
                value = display_path(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out


@dataclass(frozen=True)
class Selection:
    """Which documents of the source are evaluated (see the module docstring for the order)."""

    limit_documents: int | None = None
    min_tokens: int | None = None
    sample: int | None = None
    seed: int = 0
    sample_method: str = "random"

    def is_all(self) -> bool:
        return self.limit_documents is None and self.min_tokens is None and self.sample is None


@dataclass(frozen=True)
class TaskSpec:
    """A task: a name, a source of documents and a selection of them."""

    name: str
    source: SourceSpec
    selection: Selection = field(default_factory=Selection)
    description: str = ""
    origin: Path | None = None  # the YAML file, or None for --data
    use: str = "evaluation"     # evaluation, training or validation
    tokens: int | None = None   # size in SmolLM2-135M tokens, where the task file says
    option: str = field(default="--data", compare=False)  # the option that gave a path: --data or --eval-data

    @property
    def label(self) -> str:
        """How error messages name this task: its YAML file, or the option and path it came from."""
        if self.origin is not None:
            return str(self.origin)
        return f"{self.option} {self.source.path}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "use": self.use,
            "origin": display_path(self.origin) if self.origin else None,
            "source": self.source.to_dict(),
            "selection": asdict(self.selection),
        }


# ---------------------------------------------------------------- finding task files

def bundled_tasks_dir() -> Path | None:
    """The folder of the task files shipped with the package.

    Installed, the project's top-level ``tasks/`` folder is the package
    ``scca_eval.tasks``; in a source checkout it sits next to the ``scca_eval`` folder.
    """
    return bundled_folder("scca_eval.tasks", "tasks")


def display_path(path: Path) -> str:
    """A path as result records show it: bundled files as ``bundled:REL``, files under the
    current folder relative to it, others as they are."""
    path = Path(path)
    bundled = bundled_tasks_dir()
    for base, prefix in ((bundled, "bundled:"), (Path.cwd(), "")):
        if base is None:
            continue
        try:
            return prefix + path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            continue
    return str(path)


def _task_dirs() -> list[Path]:
    """Where task names are looked up, first match wins: ./tasks, then the bundled tasks."""
    dirs = []
    local = Path.cwd() / "tasks"
    if local.is_dir():
        dirs.append(local)
    bundled = bundled_tasks_dir()
    if bundled is not None and all(bundled.resolve() != d.resolve() for d in dirs):
        dirs.append(bundled)
    return dirs


def task_files() -> dict[str, Path]:
    """Task name -> its YAML file, ./tasks first, then the bundled tasks."""
    found: dict[str, Path] = {}
    for folder in _task_dirs():
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            found.setdefault(path.stem, path)
    return found


def list_tasks() -> dict[str, str]:
    """Task name -> one-line description, for help texts (./tasks first, then bundled)."""
    out = {}
    for name, path in sorted(task_files().items()):
        try:
            description = load_task(path).description
            out[name] = description.splitlines()[0] if description else ""
        except UserError as error:
            out[name] = f"(not usable: {error})"
    return out


def load_task(name_or_path: str | Path) -> TaskSpec:
    """The task named ``name_or_path`` (./tasks/NAME.yaml, then the bundled tasks) or in that YAML file."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text \
        or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"task file {text} does not exist; give an existing .yaml file or a task name "
                            f"({', '.join(sorted(task_files())) or 'none found'})")
        return parse_task_file(path)
    files = task_files()
    if text not in files:
        known = ", ".join(sorted(files)) or "none found"
        raise UserError(f"unknown task '{text}'; known tasks: {known} (or give a task YAML path, "
                        "or evaluate a file or folder with --data PATH)")
    return parse_task_file(files[text])


# ---------------------------------------------------------------- parsing and checking

def _fail(origin: Path, where: str, problem: str, fix: str) -> UserError:
    return UserError(f"{origin}: {where}: {problem}; {fix}")


def parse_task_file(path: Path) -> TaskSpec:
    """Read and check one task YAML file; every problem is a one-line UserError."""
    path = Path(path)
    try:
        raw_text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the task file as UTF-8") from None
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror}); check the path and its permissions") from None
    try:
        raw = yaml.safe_load(raw_text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{path}: not valid YAML ({where}: {problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a task file must be a YAML mapping with the fields "
                        f"{', '.join(TOP_LEVEL_FIELDS)}; see the bundled tasks for examples")
    return task_from_mapping(raw, origin=path.resolve())


def _check_fields(mapping: dict, allowed: dict[str, bool] | tuple, origin: Path, where: str) -> None:
    names = list(allowed)
    for key in mapping:
        if key not in names:
            raise _fail(origin, f"{where}{key}", "unknown field", f"allowed fields are {', '.join(names)}")
    if isinstance(allowed, dict):
        for key, required in allowed.items():
            if required and mapping.get(key) is None:
                raise _fail(origin, f"{where}{key}", "missing", "add it (see the bundled tasks for examples)")


def _string(mapping: dict, key: str, origin: Path, where: str, default=None) -> str | None:
    value = mapping.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(origin, f"{where}{key}", f"must be a non-empty string, got {value!r}", "quote it as text")
    return value


def _int(mapping: dict, key: str, origin: Path, minimum: int, default=None) -> int | None:
    value = mapping.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(origin, f"selection.{key}", f"must be a whole number of at least {minimum}, got {value!r}",
                    "fix the value")
    return value


def _resolve_path(value: str, origin: Path, where: str, *, must_be_file: bool = False) -> Path:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = origin.parent / path
    path = path.resolve()
    if not path.exists():
        raise _fail(origin, where, f"{path} does not exist",
                    "fix the path (relative paths are relative to the task file)")
    if must_be_file and not path.is_file():
        raise _fail(origin, where, f"{path} is not a file", "give the .bin file itself")
    return path


def _parse_source(raw: Any, origin: Path) -> SourceSpec:
    if not isinstance(raw, dict):
        raise _fail(origin, "source", "must be a mapping with a 'type' field",
                    f"e.g. source: {{type: text, path: my_texts/}} (types: {', '.join(SOURCE_TYPES)})")
    kind = raw.get("type")
    if kind not in SOURCE_TYPES:
        problem = "missing" if kind is None else f"unknown type {kind!r}"
        raise _fail(origin, "source.type", problem, f"use one of {', '.join(SOURCE_TYPES)}")
    _check_fields(raw, SOURCE_FIELDS[kind], origin, "source.")
    values: dict[str, Any] = {"type": kind}
    for key in ("glob", "text_field", "id_field", "dataset", "config", "split", "revision", "corpus"):
        if key in raw:
            values[key] = _string(raw, key, origin, "source.")
    if "streaming" in raw:
        if not isinstance(raw["streaming"], bool):
            raise _fail(origin, "source.streaming", f"must be true or false, got {raw['streaming']!r}",
                        "fix the value")
        values["streaming"] = raw["streaming"]
    if "data_files" in raw:
        files = raw["data_files"]
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise _fail(origin, "source.data_files", f"must be a file name or a list of them, got {raw['data_files']!r}",
                        "list the data files inside the dataset repository")
        values["data_files"] = tuple(files)
    if kind == "built":
        _check_built(values, origin)
    if "path" in raw:
        path = _string(raw, "path", origin, "source.")
        values["path"] = _resolve_path(path, origin, "source.path", must_be_file=kind == "longlora_bin")
    return SourceSpec(**{k: v for k, v in values.items() if v is not None})


def _check_built(values: dict, origin: Path) -> None:
    from .corpora import CORPORA, SPLITS

    if values["corpus"] not in CORPORA:
        raise _fail(origin, "source.corpus", f"unknown corpus {values['corpus']!r}", f"use one of {', '.join(CORPORA)}")
    if values["split"] not in SPLITS:
        raise _fail(origin, "source.split", f"unknown split {values['split']!r}", f"use one of {', '.join(SPLITS)}")


def _parse_selection(raw: Any, origin: Path, source: SourceSpec) -> Selection:
    if raw is None:
        return Selection()
    if not isinstance(raw, dict):
        raise _fail(origin, "selection", "must be a mapping", f"fields: {', '.join(SELECTION_FIELDS)}")
    _check_fields(raw, SELECTION_FIELDS, origin, "selection.")
    if raw and source.type == "longlora_bin":
        raise _fail(origin, "selection", "does not apply to a longlora_bin token stream",
                    "remove it (the stream is evaluated as it is)")
    method = raw.get("sample_method", "random")
    if method not in SAMPLE_METHODS:
        raise _fail(origin, "selection.sample_method", f"unknown method {method!r}",
                    f"use one of {', '.join(SAMPLE_METHODS)}")
    return Selection(
        limit_documents=_int(raw, "limit_documents", origin, 1),
        min_tokens=_int(raw, "min_tokens", origin, 1),
        sample=_int(raw, "sample", origin, 1),
        seed=_int(raw, "seed", origin, 0, default=0),
        sample_method=method,
    )


def task_from_mapping(raw: dict, *, origin: Path) -> TaskSpec:
    """A TaskSpec from an already parsed YAML mapping; ``origin`` names it in errors."""
    _check_fields(raw, TOP_LEVEL_FIELDS, origin, "")
    name = _string(raw, "name", origin, "")
    if not _NAME_RE.match(name):
        raise _fail(origin, "name", f"{name!r} has characters other than letters, digits, '_', '-', '.'",
                    "rename the task (the name is used in result file names)")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise _fail(origin, "description", f"must be text, got {description!r}", "quote it")
    use = raw.get("use", "evaluation")
    if use not in USES:
        raise _fail(origin, "use", f"unknown use {use!r}", f"use one of {', '.join(USES)}")
    tokens = raw.get("tokens")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise _fail(origin, "tokens", f"must be a whole number of tokens, got {tokens!r}", "fix or remove it")
    source = _parse_source(raw["source"], origin)
    selection = _parse_selection(raw.get("selection"), origin, source)
    return TaskSpec(name=name, description=description.strip(), source=source, selection=selection,
                    origin=origin, use=use, tokens=tokens)


# ---------------------------------------------------------------- --data PATH

def is_jsonl_file(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES)


def visible_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.rglob("*")
         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def _name_from_path(path: Path) -> str:
    stem = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".parquet", ".bin", ".txt.gz", ".txt"):
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "_", stem).strip("_.-")
    return name or "data"


def task_from_data_path(path: str | Path, option: str = "--data") -> TaskSpec:
    """An ad-hoc task for ``--data PATH``: a file or a folder, its kind told by the file names.
    ``option`` is how errors name the option the path came from (``--eval-data`` for validation text).

    A ``.jsonl`` / ``.jsonl.gz`` file is read as JSON lines with the field ``text``, a
    ``.parquet`` file likewise, a ``.bin`` file as a LongLoRA token stream, any other file
    as one plain-text document (gzip-compressed when its name ends in ``.gz``). A folder of only JSON-lines (or only parquet) files is read
    as those; any other folder as plain text, one document per file.
    """
    given = str(path)
    path = Path(given).expanduser()
    if not path.exists():
        raise UserError(f"{option} {given}: no such file or folder; check the path")
    label = f"{option} {given}"
    if path.is_file():
        if is_jsonl_file(path):
            kind = "jsonl"
        elif path.suffix == ".parquet":
            kind = "parquet"
        elif path.suffix == ".bin":
            kind = "longlora_bin"
        else:
            kind = "text"
    elif path.is_dir():
        files = visible_files(path)
        if not files:
            raise UserError(f"{label}: the folder holds no files; put text files (one document each) in it")
        if all(is_jsonl_file(f) for f in files):
            kind = "jsonl"
        elif all(f.suffix == ".parquet" for f in files):
            kind = "parquet"
        elif any(f.suffix == ".bin" for f in files):
            raise UserError(f"{label}: the folder holds .bin token files; give one .bin file itself to {option}")
        else:
            kind = "text"
    else:
        raise UserError(f"{label}: not a regular file or folder; give a file or a folder of files")
    source = SourceSpec(type=kind, path=path.resolve())
    return TaskSpec(name=_name_from_path(path.resolve()), source=source,
                    description=f"local data {given}", origin=None, option=option)
