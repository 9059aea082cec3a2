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

Other settings: ``data`` (files or folders evaluated as ad-hoc tasks), ``stride``,
``last_window``, ``batch_size``, ``dtype``, ``device``, ``chunk_size``, ``dilation``, ``add_bos``,
``allow_long_context``, ``seed``, ``attention_backend``, ``compile``. Relative paths are relative to the
folder the command runs in, as on the command line.
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

if TYPE_CHECKING:
    from ..patterns.spec import PatternSpec

DEFAULT_OUT = "results/sweep"
# load_model options that may be set per model in a sweep file
MODEL_OPTIONS = ("adapter", "merge_adapter", "trainable_params", "rope_scaling", "original_ctx",
                 "finetuned_ctx", "tokenizer")

# sweep setting -> (kind, default); kinds are checked by _read_setting
SETTINGS: dict[str, tuple[str, Any]] = {
    "models": ("models", ["default"]),
    "patterns": ("patterns", ["full"]),
    "ctx": ("ints", [1024]),
    "tasks": ("strings", []),
    "data": ("strings", []),
    "out": ("string", DEFAULT_OUT),
    "stride": ("int", None),
    "last_window": ("string", "full"),
    "max_tokens": ("int", None),
    "batch_size": ("int", None),
    "dtype": ("string", None),
    "device": ("string", None),
    "chunk_size": ("int", None),
    "dilation": ("int", None),
    "add_bos": ("bool", False),
    "allow_long_context": ("bool", False),
    "seed": ("int", 0),
    "attention_backend": ("string", "auto"),
    "compile": ("bool", False),
}


@dataclass(frozen=True)
class ModelEntry:
    """A model of the sweep and its own load_model options (adapter, RoPE scaling, ...)."""

    model: str
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class Sweep:
    """A validated sweep: every value checked, nothing loaded yet."""

    models: list[ModelEntry]
    patterns: list               # PatternSpec, one per distinct pattern
    ctx: list[int]
    tasks: list                  # (TaskSpec, evaluate() arguments naming it)
    out: Path
    stride: int | None = None
    last_window: str = "full"
    max_tokens: int | None = None
    batch_size: int | None = None
    dtype: str | None = None
    device: str | None = None
    chunk_size: int | None = None
    dilation: int | None = None
    add_bos: bool = False
    allow_long_context: bool = False
    seed: int = 0
    attention_backend: str = "auto"
    compile: bool = False

    def settings(self) -> dict:
        """The settings shared by every cell (for --dry-run and logs)."""
        return {key: getattr(self, key) for key in ("stride", "last_window", "max_tokens", "batch_size", "dtype", "device",
                                                    "chunk_size", "dilation", "add_bos", "allow_long_context",
                                                    "seed", "attention_backend", "compile")}

    def cell_labels(self) -> list[str]:
        """Every cell, in the order the sweep runs them."""
        return [_cell_label(m.model, task.name, spec, ctx)
                for m in self.models for task, _ in self.tasks for spec in self.patterns for ctx in self.ctx]


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
    from ..results import record_filename
    from ..validation import (check_attention_backend, check_dtype_name, check_protocol,
                             resolve_patterns, resolve_tasks)

    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise UserError(f"{where}: unknown setting {unknown[0]!r}; the settings are {', '.join(SETTINGS)}")
    values = {key: _read_setting(key, settings.get(key), where) for key in SETTINGS}

    check_protocol("stride", values["ctx"], values["stride"], last_window=values["last_window"])
    for key in ("max_tokens", "batch_size"):
        if values[key] is not None and values[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1 (got {values[key]})")
    check_dtype_name(values["dtype"])
    check_attention_backend(values["attention_backend"])

    specs: dict[str, Any] = {}
    for spec in resolve_patterns(values["patterns"], values["ctx"], chunk_size=values["chunk_size"],
                                 dilation=values["dilation"]):
        specs.setdefault(json.dumps(spec.to_dict(), sort_keys=True), spec)
    # Records are named by record_pattern_name (custom mixes by a hash of their groups), so
    # two patterns with one name would overwrite each other's records.
    names = [record_pattern_name(spec) for spec in specs.values()]
    if len(set(names)) != len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two different patterns are both named {clash!r}, so their records would overwrite "
                        "each other; run them in separate sweeps (separate --out folders)")

    # resolve_tasks gives the named tasks (the default tasks when neither tasks nor data are
    # given), then the --data ones; each is handed to evaluate() the same way, one at a time.
    task_specs = resolve_tasks(values["tasks"], values["data"])
    named = values["tasks"] or ([] if values["data"] else [spec.name for spec in task_specs])
    origins = [{"tasks": [name], "data": None} for name in named]
    origins += [{"tasks": None, "data": [path]} for path in values["data"]]
    task_names = [spec.name for spec in task_specs]
    if len(set(task_names)) != len(task_names):
        clash = next(n for n in task_names if task_names.count(n) > 1)
        raise UserError(f"two tasks are both named {clash!r}; give each task once (rename a --data folder "
                        "or write a task YAML with its own name)")

    files = {}
    for entry in values["models"]:
        name = record_filename({"model": entry.model, "task": "t", "pattern": "p", "ctx": 2, "stride": 2})
        if name in files and files[name] != entry.model:
            raise UserError(f"models {files[name]!r} and {entry.model!r} would write records of the same "
                            "name; run them in separate sweeps (separate --out folders)")
        files[name] = entry.model

    return Sweep(
        models=values["models"], patterns=list(specs.values()), ctx=values["ctx"],
        tasks=list(zip(task_specs, origins)), out=Path(values["out"]),
        **{key: values[key] for key in ("stride", "last_window", "max_tokens", "batch_size", "dtype", "device", "chunk_size",
                                        "dilation", "add_bos", "allow_long_context", "seed",
                                        "attention_backend", "compile")},
    )


# ---------------------------------------------------------------- running

def run_sweep(sweep: Sweep, *, progress=None, log: Callable[[str], None] | None = None) -> SweepResult:
    """Evaluate every cell of ``sweep`` that has no record yet; return all the cells' records.

    progress: an ``api.Progress`` (the CLI's progress bar); log: receives one line per cell.
    """
    import torch

    from ..api import evaluate
    from ..data import tokenize_task
    from ..models import load_model, model_record
    from ..records import cell_identity, existing_records, model_dtype, model_identity, sweep_key

    say = log or (lambda message: None)
    existing = existing_records(sweep.out, say)
    result = SweepResult()
    common = dict(stride=sweep.stride, last_window=sweep.last_window, batch_size=sweep.batch_size, max_tokens=sweep.max_tokens,
                  out=str(sweep.out), add_bos=sweep.add_bos, allow_long_context=sweep.allow_long_context, seed=sweep.seed,
                  attention_backend=sweep.attention_backend, compile=sweep.compile, progress=progress)
    for entry in sweep.models:
        # The patterns are resolved specs (chunk size and dilation inside): applied as they are.
        lm, tokenizer = load_model(entry.model, pattern=sweep.patterns[0], dtype=sweep.dtype, device=sweep.device,
                                   attention_backend=sweep.attention_backend, **dict(entry.options))
        try:
            model_part = model_identity(entry.model, model_record(lm, tokenizer))
            dtype = model_dtype(lm)

            def planned_key(task, tokenized, spec, ctx):
                return sweep_key(cell_identity(
                    model=model_part, task=task.name, data=tokenized.data_fingerprint,
                    tokenizer=tokenized.tokenizer_fingerprint, pattern=spec.to_dict(), ctx=ctx,
                    stride=sweep.stride or ctx, protocol="stride", last_window=sweep.last_window,
                    max_tokens=sweep.max_tokens, add_bos=sweep.add_bos, dtype=dtype), sweep.seed)

            _say_run_cost(entry.model, lm, tokenizer, sweep, existing, planned_key, say)
            for task, task_arguments in sweep.tasks:
                tokenized = tokenize_task(task, tokenizer, add_bos=sweep.add_bos)
                for spec in sweep.patterns:
                    planned = {ctx: planned_key(task, tokenized, spec, ctx) for ctx in sweep.ctx}
                    missing = [ctx for ctx, key in planned.items() if key not in existing]
                    for ctx in sweep.ctx:
                        if ctx not in missing:
                            say(f"have  {_cell_label(entry.model, task.name, spec, ctx)} "
                                f"({existing[planned[ctx]].get('path')})")
                    if missing:
                        for record in evaluate(entry.model, ctx=missing, pattern=spec, loaded=(lm, tokenizer),
                                               **task_arguments, **common):
                            key = config_key(record)
                            if key != planned[record["ctx"]]:
                                raise RuntimeError(
                                    f"the record of {_cell_label(entry.model, task.name, spec, record['ctx'])} "
                                    "does not carry the configuration the sweep planned, so it could never be "
                                    f"reused: planned {planned[record['ctx']]}, stored {key}")
                            existing[key] = record
                            result.computed += 1
                            say(f"wrote {_cell_label(entry.model, task.name, spec, record['ctx'])} "
                                f"({record.get('path')})")
                    result.reused += len(sweep.ctx) - len(missing)
                    result.records += [existing[planned[ctx]] for ctx in sweep.ctx]
        finally:
            # Free this model before the next one is loaded.
            del lm, tokenizer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result


def _say_run_cost(model_id, lm, tokenizer, sweep: Sweep, existing, planned_key, say) -> None:
    """Before a model's first cell: the cells it still has to run, their tokens and time."""
    from ..data import tokenize_task
    from ..records import device_name, record_pattern_name
    from . import cost
    from .cells import scored_tokens
    from .engine import model_device

    device = model_device(lm)
    device_text = device_name(device)
    cells = []
    for task, _ in sweep.tasks:
        tokenized = tokenize_task(task, tokenizer, add_bos=sweep.add_bos)
        for spec in sweep.patterns:
            for ctx in sweep.ctx:
                if planned_key(task, tokenized, spec, ctx) not in existing:
                    cells.append((scored_tokens(tokenized, ctx, max_tokens=sweep.max_tokens, protocol="stride"),
                                  cost.remembered_rate(device_text, model_id, record_pattern_name(spec), ctx)))
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
