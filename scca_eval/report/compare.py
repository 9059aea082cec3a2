"""Two sets of records, cell by cell: did the new checkpoint (or code) change perplexity?

Cells are matched by (task, pattern, ctx). A pair is only compared when the numbers mean
the same thing: same protocol, stride, last window, tokenizer, task data, ``--max-tokens``
and the same documents with the same scored tokens; anything else is refused with one line.
For each pair, a paired bootstrap gives the relative change of perplexity, its 95% interval
and a p-value. What it resamples (:func:`resampling_unit`): documents when the cell has at least
``MIN_UNITS`` of them (:func:`scca_eval.evaluation.metrics.paired_bootstrap`); otherwise contiguous
blocks of windows inside the documents (a single long document or token stream), from the
per-window sums the records keep, when there are at least ``MIN_UNITS`` blocks.

The gate: with ``max_regression`` (percent), a cell fails when perplexity rose by more
than that share *and* the rise is significant (p < alpha). Changes inside the noise never
fail the gate; improvements never do. A cell with too little data for either test (or
records without per-window sums) cannot show that it did not regress: it fails the gate
("fails closed"), and the report says why. So does a cell of the base that the new side lacks
(unless ``allow_missing``: a subset compared on purpose), and so does a cell whose perplexity
is NaN or infinite on either side: it is never better, and never passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import UserError
from ..evaluation.metrics import paired_bootstrap, paired_block_bootstrap
from ..records import comparable_tokenizers, comparison_key, last_window_of
from ..records.store import COMPARE_REPORT_FORMAT
from ..evaluation.window_sums import decode_windows
from .grid import PRESET_ORDER, pattern_labels


@dataclass
class CellComparison:
    task: str
    pattern: str
    ctx: int
    base_perplexity: float
    new_perplexity: float
    relative_change: float                 # new / base - 1
    ci95: tuple[float, float] | None       # of the relative change
    p_value: float | None
    documents: int
    significant: bool | None               # None: not testable (too little data)
    regression: bool = False               # fails the gate
    unit: str = "documents"                # what the bootstrap resampled
    untested_reason: str | None = None     # why there was no test
    not_finite: bool = False               # a side's perplexity is NaN or infinite: never passes

    @property
    def label(self) -> str:
        return f"{self.task} · {self.pattern} · ctx {self.ctx}"

    @property
    def verdict(self) -> str:
        if self.not_finite:
            return "**not finite: fails the gate**" if self.regression else "not finite"
        if self.significant is None:
            return "**not testable: fails the gate**" if self.regression else "not testable"
        if self.regression:
            return "**regression**"
        if not self.significant:
            return "no significant change"
        return "worse" if self.relative_change > 0 else "better"


@dataclass
class Comparison:
    cells: list[CellComparison]
    only_base: list[str]
    only_new: list[str]
    alpha: float
    max_regression: float | None           # percent, or None without a gate
    differences: list[str] = field(default_factory=list)
    base_name: str = "base"
    new_name: str = "new"
    allow_missing: bool = False            # cells only in base pass the gate (a subset on purpose)

    @property
    def regressions(self) -> list[CellComparison]:
        return [cell for cell in self.cells if cell.regression]

    @property
    def missing(self) -> list[str]:
        """The base's cells that the new side lacks and that fail the gate: a run that stopped
        part-way leaves cells out, and a gate that could not test them does not pass."""
        return self.only_base if self.max_regression is not None and not self.allow_missing else []

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.missing

    def to_dict(self) -> dict:
        """The comparison as plain data (``compare --json``): every cell with its numbers and
        verdict, the cells of one side only, the settings that differ and the gate."""
        cells = [{"task": c.task, "pattern": c.pattern, "ctx": c.ctx,
                  # JSON has no NaN or infinity: a value that is not finite is null, and "not_finite" says so
                  "base_perplexity": _finite_or_none(c.base_perplexity),
                  "new_perplexity": _finite_or_none(c.new_perplexity),
                  "relative_change": _finite_or_none(c.relative_change),
                  "ci95": list(c.ci95) if c.ci95 else None, "p_value": c.p_value, "documents": c.documents,
                  "unit": c.unit, "significant": c.significant, "regression": c.regression,
                  "not_finite": c.not_finite, "verdict": c.verdict.strip("*"),
                  "untested_reason": c.untested_reason} for c in self.cells]
        return {"format": COMPARE_REPORT_FORMAT, "base": self.base_name.strip("`"), "new": self.new_name.strip("`"),
                "alpha": self.alpha, "max_regression": self.max_regression, "allow_missing": self.allow_missing,
                "passed": self.passed if self.max_regression is not None else None, "cells": cells,
                "only_base": self.only_base, "only_new": self.only_new, "differences": self.differences}

    def to_markdown(self) -> str:
        lines = [f"### Perplexity: {self.new_name} against {self.base_name}", ""]
        lines.append("| task | pattern | ctx | base | new | change | 95% interval | p | verdict |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
        for cell in self.cells:
            interval = (f"{cell.ci95[0]:+.2%} … {cell.ci95[1]:+.2%}" if cell.ci95 else "–")
            p_value = "–" if cell.p_value is None else f"{cell.p_value:.3f}"
            change = f"{cell.relative_change:+.2%}" if math.isfinite(cell.relative_change) else "–"
            lines.append(f"| {cell.task} | {cell.pattern} | {cell.ctx} | {cell.base_perplexity:.3f} | "
                         f"{cell.new_perplexity:.3f} | {change} | {interval} | "
                         f"{p_value} | {cell.verdict} |")
        lines.append("")
        lines.append(f"Token perplexity; change = new / base − 1; paired bootstrap over documents (over "
                     f"blocks of consecutive windows where a cell has fewer than {MIN_UNITS} documents), "
                     f"significant when p < {self.alpha:g}.")
        blocks = [c for c in self.cells if c.significant is not None and c.unit != "documents"]
        for cell in blocks:
            lines.append(f"{cell.label}: resampled {cell.unit}.")
        if self.differences:
            lines.append("Settings that differ: " + "; ".join(self.differences) + ".")
        for side, cells in (("base", self.only_base), ("new", self.only_new)):
            if cells:
                consequence = "; they fail the gate (--allow-missing lets them pass)" \
                    if side == "base" and self.missing else ""
                lines.append(f"Only in {side} ({len(cells)}, not compared{consequence}): " + ", ".join(cells) + ".")
        untested = [c for c in self.cells if c.significant is None]
        for cell in untested:
            consequence = "; so it fails the gate (it cannot show that it did not regress)" \
                if self.max_regression is not None else ""
            what = "not finite" if cell.not_finite else "not testable"
            lines.append(f"{cell.label}: {what}: {cell.untested_reason}{consequence}.")
        if self.max_regression is not None:
            lines.append("")
            if self.passed:
                lines.append(f"**Gate passed**: no cell regressed by more than {self.max_regression:g}% "
                             f"with p < {self.alpha:g}.")
            else:
                regressed = [c for c in self.regressions if c.significant is not None]
                untestable = [c for c in self.regressions if c.significant is None and not c.not_finite]
                not_finite = [c for c in self.regressions if c.not_finite]
                parts = []
                if regressed:
                    worst = ", ".join(f"{c.label} ({c.relative_change:+.2%})" for c in regressed)
                    parts.append(f"{len(regressed)} of {len(self.cells)} cell(s) regressed by more than "
                                 f"{self.max_regression:g}% with p < {self.alpha:g}: {worst}")
                if untestable:
                    parts.append(f"{len(untestable)} cell(s) had too little data for a test and fail closed: "
                                 + ", ".join(c.label for c in untestable))
                if self.missing:
                    parts.append(f"{len(self.missing)} cell(s) of the base are missing on the new side: "
                                 + ", ".join(self.missing))
                if not_finite:
                    parts.append(f"{len(not_finite)} cell(s) have a perplexity that is not finite (NaN or "
                                 "infinite): " + ", ".join(c.label for c in not_finite))
                lines.append("**Gate failed**: " + "; ".join(parts) + ".")
        return "\n".join(lines)


def _finite_or_none(value):
    return value if value is None or math.isfinite(value) else None


def _not_finite_perplexity(record: dict) -> float | None:
    """The record's perplexity when it is NaN or infinite (also when a document's NLL sum is),
    else None: such a cell has nothing to test, and it never passes."""
    perplexity = record["metrics"].get("perplexity")
    if isinstance(perplexity, (int, float)) and not math.isfinite(perplexity):
        return float(perplexity)
    if not all(math.isfinite(document["nll_sum"]) for document in record["documents"]):
        return math.nan
    return None


def _not_finite_cell(key: tuple, pattern: str, base: dict, new: dict, gate: bool) -> CellComparison | None:
    """The comparison of a cell where either side's perplexity is not finite, or None."""
    values = {"base": _not_finite_perplexity(base), "new": _not_finite_perplexity(new)}
    sides = [side for side, value in values.items() if value is not None]
    if not sides:
        return None
    base_value = values["base"] if values["base"] is not None else base["metrics"].get("perplexity", math.nan)
    new_value = values["new"] if values["new"] is not None else new["metrics"].get("perplexity", math.nan)
    said = " and ".join(f"the {side} perplexity is {values[side]}" for side in sides)
    return CellComparison(
        task=key[0], pattern=pattern, ctx=key[2], base_perplexity=float(base_value),
        new_perplexity=float(new_value), relative_change=math.nan, ci95=None, p_value=None,
        documents=len(base["documents"]), significant=None, regression=gate, not_finite=True,
        untested_reason=f"{said} (the model's losses were NaN or infinite)")


def _index(records: Sequence[dict], side: str, labels: dict[str, str]) -> dict[tuple, dict]:
    cells: dict[tuple, dict] = {}
    for record in records:
        key = comparison_key(record)
        if key in cells:
            other = cells[key]
            raise UserError(f"{side} holds two records for {record['task']} · {labels[key[1]]} · ctx {key[2]} "
                            f"({other.get('path', other['model'])} and {record.get('path', record['model'])}); "
                            "give one run per side (one model, one stride)")
        cells[key] = record
    return cells


def _short(digest) -> str:
    text = str(digest or "unknown")
    return text.split(":")[-1][:12]


def _described(tokenizer: dict) -> str:
    return f"{tokenizer.get('name', '?')}, {tokenizer.get('vocab_size', '?')} tokens"


def _check_comparable(base: dict, new: dict, where: str) -> None:
    b_config, n_config = base["config"], new["config"]
    checks = [
        ("the protocols differ", b_config.get("protocol", "stride"), n_config.get("protocol", "stride"),
         "evaluate both with the same protocol"),
        ("the strides differ", base["stride"], new["stride"], "evaluate both with the same --stride"),
        ("the last windows differ", last_window_of(base), last_window_of(new),
         "evaluate both with the same --last-window (records made before the option had short last "
         "windows: evaluate the base again)"),
        ("the tokenizers differ", *comparable_tokenizers(base, new),
         "token perplexities of different tokenizers are not comparable (compare bits per byte with "
         "`scca-eval table --metric bits_per_byte`)"),
        ("the task data differ", b_config.get("data_fingerprint"), n_config.get("data_fingerprint"),
         "evaluate both on the same task files"),
        ("--max-tokens differs", b_config.get("max_tokens"), n_config.get("max_tokens"),
         "evaluate both with the same --max-tokens"),
    ]
    for problem, b_value, n_value, fix in checks:
        if b_value != n_value:
            if problem == "the tokenizers differ" and isinstance(b_value, dict):
                b_value, n_value = _described(b_value), _described(n_value)
            elif problem in ("the tokenizers differ", "the task data differ"):
                b_value, n_value = _short(b_value), _short(n_value)
            raise UserError(f"cannot compare {where}: {problem} (base {b_value}, new {n_value}); {fix}")


def _model_field(record: dict, key: str):
    return (record["config"].get("model") or {}).get(key)


def _adapter(record: dict) -> str:
    """An adapter in a few words: its folder, its weights' digest and the pattern it was trained under."""
    adapter = _model_field(record, "adapter")
    if not isinstance(adapter, dict):
        return str(adapter)
    fingerprint = adapter.get("fingerprint")
    words = [str(adapter.get("path")), _short(fingerprint.get("digest") if isinstance(fingerprint, dict) else None)]
    if adapter.get("training_pattern"):
        words.append(f"trained under {adapter['training_pattern']}")
    return f"{words[0]} ({', '.join(words[1:])})"


def _rope_scaling(record: dict) -> str:
    """A RoPE scaling as it was asked for (``linear:2``), not its whole parameter set."""
    scaling = _model_field(record, "rope_scaling")
    if not isinstance(scaling, dict):
        return str(scaling)
    return str(scaling.get("requested") or f"{scaling.get('rope_type')} {scaling.get('factor')}")


def _weights(record: dict) -> str:
    fingerprint = _model_field(record, "fingerprint")
    return _short(fingerprint.get("digest") if isinstance(fingerprint, dict) else None)


# Settings that may differ between the two sides (they are what is being compared);
# the report lists those that do, so the reader knows what changed.
_LISTED_SETTINGS = {
    "model": lambda r: r["model"],
    "weights": _weights,
    "adapter": _adapter,
    "RoPE scaling": _rope_scaling,
    "dtype": lambda r: r["config"].get("dtype"),
    "scca-eval": lambda r: (r["config"].get("versions") or {}).get("scca_eval"),
    "torch": lambda r: (r["config"].get("versions") or {}).get("torch"),
    "transformers": lambda r: (r["config"].get("versions") or {}).get("transformers"),
}


def _setting_differences(pairs: list[tuple[dict, dict]]) -> list[str]:
    out = []
    for name, get in _LISTED_SETTINGS.items():
        base_values = sorted({str(get(b)) for b, _ in pairs})
        new_values = sorted({str(get(n)) for _, n in pairs})
        if base_values != new_values:
            out.append(f"{name} {', '.join(base_values)} → {', '.join(new_values)}")
    return out


def _documents(record: dict) -> dict[str, tuple[float, int]]:
    return {str(d["id"]): (float(d["nll_sum"]), int(d["tokens"])) for d in record["documents"]}


# Fewest resampling units (documents, or blocks of windows) for a bootstrap test: with fewer,
# the resamples take too few distinct values for a p-value below 0.05 to mean anything.
MIN_UNITS = 10


def _windows(record: dict, where: str) -> dict[str, tuple] | None:
    """Document id -> (window NLL sums, window tokens), or None when any document lacks them."""
    out = {}
    for entry in record["documents"]:
        windows = decode_windows(entry, where)
        if windows is None:
            return None
        out[str(entry["id"])] = windows
    return out


def resampling_unit(base: dict, new: dict, where: str) -> tuple[str, object, str | None]:
    """What a cell's bootstrap resamples: ("documents", None, None) with at least MIN_UNITS
    documents; else ("blocks", (base windows, new windows), None) when the records keep
    per-window sums and there are at least MIN_UNITS blocks; else ("none", None, reason)."""
    n_docs = len(base["documents"])
    if n_docs >= MIN_UNITS:
        return "documents", None, None
    base_windows, new_windows = _windows(base, f"{where} (base)"), _windows(new, f"{where} (new)")
    if base_windows is None or new_windows is None:
        return "none", None, (f"{n_docs} document(s), fewer than {MIN_UNITS}, and the "
                              f"{'base' if base_windows is None else 'new'} records keep no per-window sums "
                              "(made before they were kept: evaluate again)")
    n_windows = sum(len(w[0]) for w in base_windows.values())
    blocks = sum(-(-len(w[0]) // block_length(n_windows)) for w in base_windows.values())
    if blocks < MIN_UNITS:
        return "none", None, (f"{n_docs} document(s) with {n_windows} window(s) give {blocks} block(s), fewer "
                              f"than {MIN_UNITS}; evaluate more text, or a smaller --ctx for more windows")
    return "blocks", (base_windows, new_windows), None


def block_length(n_windows: int) -> int:
    """Windows per block: about the cube root of the number of windows (the usual rate for a
    block bootstrap), so blocks are long enough to keep neighbouring windows' dependence
    together and many enough to resample."""
    return max(1, round(n_windows ** (1 / 3)))


def compare_records(base: Sequence[dict], new: Sequence[dict], *, alpha: float = 0.05,
                    max_regression: float | None = None, n_boot: int = 2000, seed: int = 0,
                    base_name: str = "base", new_name: str = "new", allow_missing: bool = False) -> Comparison:
    """Compare ``new`` records with ``base`` records cell by cell (see the module docstring).

    max_regression: percent; with it, ``Comparison.passed`` is the gate's verdict.
    allow_missing: cells of the base that the new side lacks do not fail the gate.
    """
    if not 0 < alpha < 1:
        raise UserError(f"--alpha must be between 0 and 1 (got {alpha})")
    if max_regression is not None and not (math.isfinite(max_regression) and max_regression >= 0):
        raise UserError(f"--max-regression must be a finite number of percent, 0 or more (got {max_regression})")
    if not base or not new:
        raise UserError(f"no records on the {'base' if not base else 'new'} side; give result files or folders")
    labels = pattern_labels(list(base) + list(new))
    base_cells = _index(base, "base", labels)
    new_cells = _index(new, "new", labels)

    def name(key: tuple) -> str:
        return f"{key[0]} · {labels[key[1]]} · ctx {key[2]}"

    def order(key: tuple) -> tuple:
        name = labels[key[1]].split(" (")[0]
        rank = PRESET_ORDER.index(name) if name in PRESET_ORDER else len(PRESET_ORDER)
        return (key[0], rank, labels[key[1]], key[2])

    common = sorted((key for key in base_cells if key in new_cells), key=order)
    if not common:
        raise UserError("the two sides share no (task, pattern, ctx) cell; compare runs of the same tasks, "
                        "patterns and ctx values")
    cells = []
    for key in common:
        b_record, n_record = base_cells[key], new_cells[key]
        where = name(key)
        _check_comparable(b_record, n_record, where)
        not_finite = _not_finite_cell(key, labels[key[1]], b_record, n_record, gate=max_regression is not None)
        if not_finite is not None:
            cells.append(not_finite)
            continue
        try:
            documents_test = paired_bootstrap(_documents(b_record), _documents(n_record), n_boot=0, seed=seed)
            unit, windows, reason = resampling_unit(b_record, n_record, where)
            if unit == "documents":
                test = paired_bootstrap(_documents(b_record), _documents(n_record), n_boot=n_boot, seed=seed)
            elif unit == "blocks":  # the interval and p-value; the point estimate from the documents' sums
                test = {**paired_block_bootstrap(*windows, n_boot=n_boot, seed=seed,
                                                 block=block_length(sum(len(w[0]) for w in windows[0].values()))),
                        **{k: documents_test[k] for k in ("base_perplexity", "new_perplexity", "relative_change")}}
            else:
                test = documents_test
                budget = b_record.get("config", {}).get("max_tokens")
                if budget:  # the cap, not the data, is what left too little to test
                    reason += (f" (both sides were capped at --max-tokens {budget:,}: a larger budget, or none, "
                               "gives the test more windows)")
        except UserError as error:
            raise UserError(f"cannot compare {where}: {error}") from None
        significant = None if unit == "none" else test["p_value"] < alpha
        change = test["relative_change"]
        if significant is None:  # fails closed: a gate that could not test does not pass
            regression = max_regression is not None
        else:
            regression = max_regression is not None and significant and change * 100 > max_regression
        cells.append(CellComparison(
            task=key[0], pattern=labels[key[1]], ctx=key[2],
            base_perplexity=test["base_perplexity"], new_perplexity=test["new_perplexity"],
            relative_change=change, ci95=tuple(test["ci95"]) if test["ci95"] else None,
            p_value=test["p_value"] if significant is not None else None, documents=test["documents"],
            significant=significant, regression=regression,
            unit="documents" if unit != "blocks" else f"blocks of {test['bootstrap']['block']} windows "
                                                       f"({test['bootstrap']['blocks']} blocks)",
            untested_reason=reason,
        ))
    return Comparison(
        cells=cells,
        only_base=[name(k) for k in sorted(base_cells, key=order) if k not in new_cells],
        only_new=[name(k) for k in sorted(new_cells, key=order) if k not in base_cells],
        alpha=alpha, max_regression=max_regression,
        differences=_setting_differences([(base_cells[k], new_cells[k]) for k in common]),
        base_name=base_name, new_name=new_name, allow_missing=allow_missing,
    )
