"""Published figures, shipped as data (``results/reference/*.yaml``), shown next to measured rows.

A reference file holds the rows of one published table::

    title: SCCA paper, PG19 perplexity
    source: Yuxiang Guo, "SCCA: ...", arXiv:2312.07305 (2023)
    url: https://arxiv.org/abs/2312.07305
    setting: LLaMA2-7B fine-tuned to an 8k context with each pattern
    label: LLaMA2-7B 8k            # short form of the setting, shown in each row label
    task: pg19                     # the data set the figures are for
    show_with: [pg19, pg19_sample] # measured tasks whose tables show these rows
    metric: perplexity
    ctx: [1024, 2048, 4096, 8192]
    rows:
      - {name: S2, pattern: s2, values: [11.71, 10.73, 9.98, 9.41]}

Rows are labelled ``S2 (published, LLaMA2-7B 8k)`` so they are never mistaken for
measured ones. ``--reference NAME`` looks for ``NAME.yaml`` in ``./results/reference``,
then among the reference files installed with the package; a path works too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from ..files import bundled_folder
from .grid import METRICS

FIELDS = {"title": True, "source": True, "url": False, "setting": True, "label": True, "task": True,
          "show_with": False, "metric": True, "ctx": True, "rows": True, "notes": False}
ROW_FIELDS = ("name", "pattern", "values")


@dataclass(frozen=True)
class ReferenceRow:
    name: str                 # as the source names it (S2, SCCA_fixed, ...)
    pattern: str              # the scca-eval pattern it corresponds to
    values: dict[int, float]  # ctx -> published value


@dataclass(frozen=True)
class ReferenceSet:
    path: Path
    title: str
    source: str
    setting: str
    label: str
    task: str
    metric: str
    show_with: tuple[str, ...]
    rows: tuple[ReferenceRow, ...]
    url: str | None = None

    def row_label(self, row: ReferenceRow) -> str:
        return f"{row.name} (published, {self.label})"

    def source_line(self) -> str:
        where = f" <{self.url}>" if self.url else ""
        return f"Published rows: {self.title}. {self.source}{where}. Setting: {self.setting}."


def bundled_reference_dir() -> Path | None:
    """The reference files installed with the package (``results/reference`` of the source tree)."""
    return bundled_folder("scca_eval.reference", "results/reference")


def _reference_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in (Path.cwd() / "results" / "reference", bundled_reference_dir()):
        if folder is not None and folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def list_references() -> dict[str, str]:
    """Reference name -> title, for help texts."""
    out = {}
    for name, path in _reference_files().items():
        try:
            out[name] = load_reference(path).title
        except UserError as error:
            out[name] = f"(not usable: {error})"
    return out


def load_reference(name_or_path: str | Path) -> ReferenceSet:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        files = _reference_files()
        if text not in files:
            known = ", ".join(sorted(files)) or "none found"
            raise UserError(f"unknown reference {text!r}; give a reference YAML file or one of: {known}")
        path = files[text]
    return _parse(path)


def _fail(path: Path, where: str, problem: str) -> UserError:
    return UserError(f"{path}: {where}: {problem}; see results/reference/scca_paper_pg19.yaml for the format")


def _parse(path: Path) -> ReferenceSet:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{path}: cannot read the reference file ({problem}); fix or replace it") from None
    if not isinstance(raw, dict):
        raise _fail(path, "file", "must be a YAML mapping")
    for key in raw:
        if key not in FIELDS:
            raise _fail(path, key, f"unknown field (allowed: {', '.join(FIELDS)})")
    for key, required in FIELDS.items():
        if required and raw.get(key) in (None, "", []):
            raise _fail(path, key, "missing")
    ctxs = raw["ctx"]
    if not isinstance(ctxs, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 2
                                             for c in ctxs):
        raise _fail(path, "ctx", f"must be a list of whole numbers of at least 2, got {ctxs!r}")
    if not isinstance(raw["rows"], list):
        raise _fail(path, "rows", "must be a list of {name, pattern, values}")
    rows = []
    for index, item in enumerate(raw["rows"], start=1):
        where = f"rows[{index}]"
        if not isinstance(item, dict) or set(item) != set(ROW_FIELDS):
            raise _fail(path, where, f"must have exactly the fields {', '.join(ROW_FIELDS)}")
        values = item["values"]
        if not isinstance(values, list) or len(values) != len(ctxs):
            raise _fail(path, f"{where}.values", f"must list one value per ctx ({len(ctxs)})")
        cells = {}
        for ctx, value in zip(ctxs, values):
            if value is None:  # not published for this ctx
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _fail(path, f"{where}.values", f"{value!r} is not a number")
            cells[ctx] = float(value)
        rows.append(ReferenceRow(str(item["name"]), str(item["pattern"]), cells))
    if raw["metric"] not in METRICS:
        raise _fail(path, "metric", f"unknown metric {raw['metric']!r} (use one of {', '.join(METRICS)})")
    show_with = raw.get("show_with") or [raw["task"]]
    if isinstance(show_with, str):
        show_with = [show_with]
    return ReferenceSet(
        path=path, title=str(raw["title"]).strip(), source=str(raw["source"]).strip(),
        setting=str(raw["setting"]).strip(), label=str(raw["label"]).strip(), task=str(raw["task"]),
        metric=str(raw["metric"]), show_with=tuple(map(str, show_with)), rows=tuple(rows),
        url=str(raw["url"]) if raw.get("url") else None,
    )
