"""What makes two records the same cell: names and identities.

A cell's identity (the settings that decide its numbers) is defined here once and used
three ways: a progress file must match it to be resumed (``evaluation/resume.py``), a
sweep or a passkey run reuses a stored record that matches it (``config_key``,
``store.existing_records``), and ``compare`` pairs cells by task, pattern settings and ctx.
"""

from __future__ import annotations

import hashlib
import json


# ---------------------------------------------------------------- names and identities

def record_pattern_name(spec) -> str:
    """The ``pattern`` of a record (and of its file name): the preset name, or for a custom mix
    ``custom-`` and 8 hex digits of the sha256 of its canonical text (``spec.canonical()``,
    e.g. ``1/2 local + 1/2 cross(1)``), so two different mixes never share a record file,
    and the same mix written two ways (``0.5 local`` / ``1/2 local``, text or YAML list)
    gets the same name. Chunk size and dilation are not part of the name, as for presets;
    the record's ``config.pattern`` holds every setting."""
    if spec.name != "custom":
        return spec.name
    return "custom-" + hashlib.sha256(spec.canonical().encode("utf-8")).hexdigest()[:8]


def pattern_config(record: dict) -> dict:
    """The record's pattern settings ({name, groups, chunk_size, chunk_ratio, dilation})."""
    config = record.get("config", {}).get("pattern")
    return config if isinstance(config, dict) else {"name": record["pattern"]}


def pattern_identity(record: dict) -> str:
    """Equal for two records exactly when they ran the same pattern with the same settings."""
    return json.dumps(pattern_config(record), sort_keys=True)


def comparison_key(record: dict) -> tuple:
    """The cell a record answers in a comparison of two runs: task, pattern settings, ctx."""
    return (record["task"], pattern_identity(record), int(record["ctx"]))


def last_window_of(record: dict) -> str | None:
    """How the record's protocol ended a document: "full" (its last window right-aligned and
    ctx long), "short" (only the tokens left), or None (a protocol without per-document
    windows: LongLoRA's stream, passkey). Records made before the option existed say nothing
    and were made with short last windows."""
    config = record.get("config", {})
    protocol = config.get("protocol", "stride")
    if protocol not in ("stride", "lm-eval"):
        return None
    return config.get("last_window") or ("full" if protocol == "lm-eval" else "short")


def model_identity(model_id: str, model_info: dict) -> dict:
    """The model part of a cell's identity: id, weights digest, adapter, RoPE scaling."""
    fingerprint = model_info.get("fingerprint")
    return {
        "id": model_id,
        "weights": fingerprint.get("digest") if isinstance(fingerprint, dict) else None,
        "adapter": model_info.get("adapter"),
        "rope_scaling": model_info.get("rope_scaling"),
    }


def cell_identity(*, model: dict, task: str, data, tokenizer, pattern: dict, ctx: int, stride: int,
                  protocol: str, last_window, max_tokens, add_bos, dtype) -> dict:
    """Everything that decides a cell's per-document sums (``model`` from model_identity)."""
    return {"model": model, "task": task, "data": data, "tokenizer": tokenizer, "pattern": pattern,
            "ctx": ctx, "stride": stride, "protocol": protocol, "last_window": last_window,
            "max_tokens": max_tokens, "add_bos": add_bos, "dtype": dtype}


def record_identity(record: dict) -> dict:
    """The cell_identity of a stored or just computed record."""
    config = record["config"]
    return cell_identity(
        model=model_identity(record["model"], config.get("model") or {}), task=record["task"],
        data=config.get("data_fingerprint"), tokenizer=config.get("tokenizer_fingerprint"),
        pattern=config.get("pattern"), ctx=record["ctx"], stride=record["stride"],
        protocol=config.get("protocol", "stride"), last_window=last_window_of(record),
        max_tokens=config.get("max_tokens"), add_bos=config.get("add_bos"), dtype=config.get("dtype"))


def passkey_identity(record: dict) -> dict:
    """What decides a passkey record: model (id, weights, adapter, RoPE scaling), tokenizer,
    pattern settings, ctx, the trials (count, depths, seed) and dtype."""
    config = record["config"]
    return {"model": model_identity(record["model"], config.get("model") or {}),
            "tokenizer": config.get("tokenizer_fingerprint"), "pattern": config.get("pattern"),
            "ctx": record["ctx"], "passkey": config.get("passkey"), "dtype": config.get("dtype")}


def is_passkey_record(record: dict) -> bool:
    return record.get("config", {}).get("protocol") == "passkey"


def identity_of(record: dict) -> dict:
    """The identity of a record of either kind: a perplexity cell's or a passkey cell's."""
    if is_passkey_record(record):
        return passkey_identity(record)
    return record_identity(record)


# identity field -> how a user names it
_IDENTITY_WORDS = {
    "model.id": "the model", "model.weights": "the model's weights", "model.adapter": "the adapter (--adapter)",
    "model.rope_scaling": "the RoPE scaling (--rope-scaling)", "task": "the task", "data": "the data",
    "tokenizer": "the tokenizer", "pattern": "the pattern settings (--chunk-size, --dilation)", "ctx": "ctx",
    "stride": "the stride (--stride)", "protocol": "the protocol (--protocol)",
    "last_window": "the last window (--last-window)", "max_tokens": "the token budget (--max-tokens)",
    "add_bos": "the BOS setting (--bos)", "dtype": "the dtype (--dtype)",
    "passkey": "the passkey trials (--trials, --depths, --seed)",
}


def identity_difference(first: dict, second: dict) -> str | None:
    """None when the two records are of one identity, else the settings that differ, in words."""
    a, b = identity_of(first), identity_of(second)
    if set(a) != set(b):
        return "their kind (a perplexity record and a passkey record)"
    a["tokenizer"], b["tokenizer"] = comparable_tokenizers(first, second)
    return identities_difference(a, b)


def identities_difference(a: dict, b: dict) -> str | None:
    """None when two identities (``record_identity``, ``passkey_identity``) are equal, else the
    settings that differ, in words."""
    differing = []
    for key in dict.fromkeys([*a, *b]):
        if key == "model" and isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            differing += [f"model.{part}" for part in a[key] if a[key].get(part) != b[key].get(part)]
        elif _text(a.get(key)) != _text(b.get(key)):
            differing.append(key)
    return ", ".join(_IDENTITY_WORDS.get(key, key) for key in differing) or None


def _text(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def comparable_tokenizers(first: dict, second: dict) -> tuple:
    """What two records say of their tokenizers, in a form that can be compared: the tokenizer
    fingerprints, unless one record is of schema 1, whose fingerprint is of another kind (a
    digest of the serialized form, which changes with the `tokenizers` release; passkey records
    held yet another); then the tokenizer summaries without their fingerprints, where both
    records have one."""
    older = first.get("schema", 1) < 2 or second.get("schema", 1) < 2
    described = _tokenizer_described(first), _tokenizer_described(second)
    if older and all(described):
        return described
    return first["config"].get("tokenizer_fingerprint"), second["config"].get("tokenizer_fingerprint")


def _tokenizer_described(record: dict) -> dict:
    """The record's tokenizer summary (name, class, size, BOS/EOS ids and habits), without its fingerprint."""
    summary = (record.get("config", {}).get("model") or {}).get("tokenizer") or {}
    return {key: value for key, value in summary.items() if key != "fingerprint"}


def progress_key(record: dict, scored_tokens: int) -> dict:
    """What a progress file must match to be resumed: the cell, and the targets it scores."""
    return {**record_identity(record), "scored_tokens": scored_tokens}


def sweep_key(identity: dict, seed) -> str:
    """What decides whether a stored record answers a cell of a sweep: the cell identity and
    the bootstrap seed, as JSON with sorted keys (equal settings give equal text, whether
    they come from a record read back from disk or from a planned cell)."""
    return json.dumps({**identity, "seed": seed}, sort_keys=True, default=str)


def config_key(record: dict) -> str:
    """The key under which a stored record answers a planned cell: for a perplexity record its
    sweep_key, for a passkey record its passkey_identity as JSON with sorted keys."""
    if is_passkey_record(record):
        return json.dumps(passkey_identity(record), sort_keys=True, default=str)
    return sweep_key(record_identity(record), record["config"].get("bootstrap_seed"))
