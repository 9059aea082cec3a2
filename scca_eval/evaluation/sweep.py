"""Sweeps: the grid models × tasks × patterns × ctx, one record per cell, resumable.

Each model is loaded once and each pattern applied to it in turn; each task is tokenized
once per tokenizer (the data module caches the token ids on disk, so later cells and later
runs reuse them). A record is written as soon as its cell is done, so an interrupted sweep
keeps what it finished, and a cell is skipped when the output folder already holds a
record made with the same configuration (``records.config_key``). Running the same sweep
again therefore continues where it stopped, and a changed setting recomputes exactly the
cells it affects.

A sweep is given by options or by a YAML file (command-line options win)::

    models:                      # model ids or paths, or mappings with per-model options
      - default
      - {model: ./llama-2-7b-longlora-8k, rope_scaling: "linear:2"}
    patterns: [full, s2, scca_fixed, scca_flow, sda, longmixed]
    ctx: [1024, 2048, 4096, 8192]
    tasks: [pg19_sample, proof_pile_sample]
    max_tokens: 16384
    out: results/smollm2-135m

Other settings: ``data`` (files or folders evaluated as ad-hoc tasks) and the other fields of
``EvalSettings`` that ``settings.SWEEP_FILE_KINDS`` lists (``protocol``, ``stride``, ``batch_size``,
``dtype``, ``device``, ...), each as the option of the same name (``protocol`` is set in the file only: ``sweep`` has no
``--protocol``). Relative paths are relative
to the folder the command runs in, as on the command line.

The settings are read into one ``EvalSettings`` and checked once; each cell gets its own
(``EvalSettings.for_cell``), from which both its record and the identity the sweep looks
for among the stored records are made (``cells.predicted_key``).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import yaml

from ..errors import UserError
from ..records import config_key  # a stored record's key (re-exported for the tests and callers)
from .settings import SWEEP_FILE_KINDS, EvalSettings

if TYPE_CHECKING:
    from ..patterns.spec import PatternSpec

DEFAULT_OUT = "results/sweep"


def _default(name: str):
    default = EvalSettings.__dataclass_fields__[name].default
    return list(default) if isinstance(default, tuple) else default

# load_model options that may be set per model in a sweep file
MODEL_OPTIONS = ("adapter", "merge_adapter", "trainable_params", "rope_scaling", "original_ctx",
                 "finetuned_ctx", "tokenizer")

# sweep setting -> (kind, default); kinds are checked by _read_setting. Besides the models and
# the folder, every setting is a field of EvalSettings, with its default.
SETTINGS: dict[str, tuple[str, Any]] = {
    "models": ("models", ["default"]),
    "out": ("string", DEFAULT_OUT),
    **{name: (kind, _default(name)) for name, kind in SWEEP_FILE_KINDS.items()},
}


@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep and its own load_model options (adapter, RoPE scaling, ...)."""

    model: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class SweepCell:
    """One cell of a sweep: its task, pattern and ctx, and its own settings (for every model)."""

    task: Any                    # TaskSpec
    spec: Any                    # PatternSpec
    ctx: int
    settings: EvalSettings


@dataclass
class Sweep:
    """A validated sweep: every value checked, nothing loaded yet."""

    models: list[ModelEntry]
    settings: EvalSettings       # checked; its patterns are distinct PatternSpecs
    cells: list[SweepCell]       # in the order the sweep runs them for each model
    out: Path

    @property
    def patterns(self) -> list:
        return self.settings.pattern_specs

    def settings_line(self) -> str:
        """The settings shared by every cell (for --dry-run and logs)."""
        shared = [key for key in SWEEP_FILE_KINDS if key not in ("patterns", "ctx", "tasks", "data")]
        return ", ".join(f"{key}={getattr(self.settings, key)}" for key in shared)

    def cell_labels(self) -> list[str]:
        """Every cell, in the order the sweep runs them."""
        return [_cell_label(m.model, cell.task.name, cell.spec, cell.ctx) for m in self.models for cell in self.cells]


@dataclass
class SweepResult:
    records: list[dict] = field(default_factory=list)  # one per cell, in sweep order
    computed: int = 0
    reused: int = 0


def _cell_label(model: str, task: str, spec: PatternSpec, ctx: int) -> str:
    from ..records import record_pattern_name

    # The name the cell's record carries (custom mixes: "custom-<8 hex>"), so labels tell mixes apart.
    return f"{model} · {task} · {record_pattern_name(spec)} · ctx {ctx}"


# ---------------------------------------------------------------- reading settings

def load_sweep_file(path: str | Path) -> dict:
    """The settings of a sweep YAML file (checked later, with the command-line options)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist; give an existing .yaml file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read ({error}); check the file") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "somewhere"
        raise UserError(f"{path}: not valid YAML ({where}: {getattr(error, 'problem', None) or error}); "
                        "fix the syntax") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file must be a YAML mapping of settings ({', '.join(SETTINGS)})")
    for key in raw:
        if key not in SETTINGS:
            raise UserError(f"{path}: unknown setting {key!r}; the settings are {', '.join(SETTINGS)}")
    return raw


def _fail(where: str, key: str, problem: str) -> UserError:
    return UserError(f"{where}: {key}: {problem}")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _read_setting(key: str, value: Any, where: str) -> Any:
    kind, default = SETTINGS[key]
    if value is None:
        if default is None:
            return None
        value = default  # defaults go through the same reading (e.g. model names -> ModelEntry)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, key, f"{value!r} is not a whole number")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(where, key, f"{value!r} is not true or false")
        return value
    if kind == "string":
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise _fail(where, key, f"{value!r} is not a non-empty text")
        return str(value)
    if kind == "ints":
        items = _as_list(value)
        if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise _fail(where, key, f"{value!r} is not a whole number or a list of them, e.g. [1024, 2048]")
        return list(dict.fromkeys(items))
    if kind == "strings":
        items = _as_list(value)
        if any(not isinstance(v, (str, Path)) or not str(v).strip() for v in items):
            raise _fail(where, key, f"{value!r} is not a name or a list of names")
        return list(dict.fromkeys(str(v) for v in items))
    if kind == "patterns":
        items = _as_list(value)
        # A custom mix may be written in YAML as a list of {share, rule} mappings.
        if not items or any(not isinstance(v, (str, list)) for v in items):
            raise _fail(where, key, f"{value!r} is not a pattern or a list of patterns")
        return items
    # models
    entries = []
    for item in _as_list(value):
        if isinstance(item, (str, Path)) and str(item).strip():
            entries.append(ModelEntry(str(item)))
        elif isinstance(item, dict) and isinstance(item.get("model"), (str, Path)):
            unknown = sorted(set(item) - {"model", *MODEL_OPTIONS})
            if unknown:
                raise _fail(where, key, f"unknown model option {unknown[0]!r} "
                                        f"(per-model options: {', '.join(MODEL_OPTIONS)})")
            options = tuple(sorted((k, v) for k, v in item.items() if k != "model" and v is not None))
            entries.append(ModelEntry(str(item["model"]), options))
        else:
            raise _fail(where, key, f"{item!r} is neither a model id nor a mapping with a 'model' field")
    if not entries:
        raise _fail(where, key, "give at least one model")
    return list(dict.fromkeys(entries))


def make_sweep(settings: dict, where: str = "sweep") -> Sweep:
    """Check every setting (bad input fails here, before any model is loaded)."""
    from ..records import record_pattern_name
    from ..records import record_filename

    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise UserError(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(SETTINGS)}")
    values = {key: _read_setting(key, settings.get(key), where) for key in SETTINGS}
    shared = EvalSettings(**{key: values[key] for key in SWEEP_FILE_KINDS}, out=values["out"])
    shared.check()

    specs: dict[str, Any] = {}
    for spec in shared.pattern_specs:
        specs.setdefault(json.dumps(spec.to_dict(), sort_keys=True), spec)
    # Records are named by record_pattern_name (custom mixes by a hash of their groups), so
    # two patterns with one name would overwrite each other's records.
    names = [record_pattern_name(spec) for spec in specs.values()]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two different patterns are both named {clash!r}, so their records would overwrite "
                        "each other; run them in separate sweeps (separate --out folders)")
    shared = shared.for_patterns(list(specs.values()))

    # task_specs holds the named tasks (the default tasks when neither tasks nor data are
    # given), then the --data ones; each cell names its own the same way.
    task_specs = shared.task_specs
    named = list(shared.tasks) or ([] if shared.data else [spec.name for spec in task_specs])
    origins = [{"task": name} for name in named] + [{"data": path} for path in shared.data]

    files = {}
    for entry in values["models"]:
        name = record_filename({"model": entry.model, "task": "t", "pattern": "p", "ctx": 2, "stride": 2})
        if name in files and files[name] != entry.model:
            raise UserError(f"models {files[name]!r} and {entry.model!r} would write records of the same "
                            "name; run them in separate sweeps (separate --out folders)")
        files[name] = entry.model

    cells = [SweepCell(task, spec, ctx, shared.for_cell(pattern=spec, ctx=ctx, task_spec=task, **origin))
             for task, origin in zip(task_specs, origins) for spec in shared.pattern_specs for ctx in shared.ctx]
    return Sweep(models=values["models"], settings=shared, cells=cells, out=Path(values["out"]))


# ---------------------------------------------------------------- running

def run_sweep(sweep: Sweep, *, progress=None, log: Callable[[str], None] | None = None) -> SweepResult:
    """Evaluate every cell of ``sweep`` that has no record yet; return all the cells' records.

    progress: an ``api.Progress`` (the CLI's progress bar); log: receives one line per cell.
    """
    import torch

    from ..api import evaluate
    from ..data import tokenize_task
    from ..models import load_model, model_record
    from ..records import existing_records, model_dtype, model_identity
    from .cells import predicted_key

    say = log or (lambda message: None)
    existing = existing_records(sweep.out, say)
    result = SweepResult()
    shared = sweep.settings
    for entry in sweep.models:
        # The patterns are resolved specs (chunk size and dilation inside): applied as they are.
        lm, tokenizer = load_model(entry.model, pattern=sweep.patterns[0], dtype=shared.dtype, device=shared.device,
                                   attention_backend=shared.attention_backend, **dict(entry.options))
        try:
            model_part = model_identity(entry.model, model_record(lm, tokenizer))
            dtype = model_dtype(lm)
            planned, tokenized = [], None  # the key of each cell's record, in the order of sweep.cells
            for cell in sweep.cells:
                if tokenized is None or tokenized.task.name != cell.task.name:  # the cells come task by task
                    tokenized = tokenize_task(cell.task, tokenizer, add_bos=shared.add_bos)
                planned.append(predicted_key(cell.settings, model_part=model_part, tokenized=tokenized,
                                             spec=cell.spec, ctx=cell.ctx, dtype=dtype))
            del tokenized
            _say_run_cost(entry.model, lm, tokenizer, sweep, existing, planned, say)
            for cell, key in zip(sweep.cells, planned):
                label = _cell_label(entry.model, cell.task.name, cell.spec, cell.ctx)
                if key in existing:
                    say(f"have  {label} ({existing[key].get('path')})")
                    result.reused += 1
                else:
                    (record,) = evaluate(entry.model, cell.settings, loaded=(lm, tokenizer), progress=progress)
                    if config_key(record) != key:
                        raise RuntimeError(f"the record of {label} does not carry the configuration the sweep "
                                           f"planned, so it could never be reused: planned {key}, "
                                           f"stored {config_key(record)}")
                    existing[key] = record
                    result.computed += 1
                    say(f"wrote {label} ({record.get('path')})")
                result.records.append(existing[key])
        finally:
            # Free this model before the next one is loaded.
            del lm, tokenizer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result


def _say_run_cost(model_id, lm, tokenizer, sweep: Sweep, existing, planned, say) -> None:
    """Before a model's first cell: the cells it still has to run, their tokens and time."""
    from ..data import tokenize_task
    from ..records import device_name, record_pattern_name
    from . import cost
    from .engine import model_device

    device = model_device(lm)
    device_text = device_name(device)
    cells, tokenized = [], None
    for cell, key in zip(sweep.cells, planned):
        if key in existing:
            continue
        if tokenized is None or tokenized.task.name != cell.task.name:
            tokenized = tokenize_task(cell.task, tokenizer, add_bos=sweep.settings.add_bos)
        tokens = cell.settings.protocol.scored_tokens(tokenized, cell.ctx, cell.settings.max_tokens)
        cells.append((tokens, cost.remembered_rate(device_text, model_id, record_pattern_name(cell.spec), cell.ctx)))
    line = cost.run_line(cells, on_cpu=device.type == "cpu")
    if line:
        say(line)


def split_patterns(values: Sequence[str]) -> list[str]:
    """The items of a multi-value option or setting, as every command reads them: commas
    separate items, except inside parentheses (``dilated(2,0)``); repeated values add up."""
    out = []
    for value in values:
        depth, current = 0, ""
        for char in value:
            depth += char == "("
            depth -= char == ")"
            if char == "," and depth == 0:
                out.append(current)
                current = ""
            else:
                current += char
        out.append(current)
    return [p.strip() for p in out if p.strip()]
