"""What a cell will cost, said before it starts: tokens, windows, and a time estimate from the
rate the last run of the same kind reached on this device.

Rates are remembered per (device, model, pattern, ctx) in ``rates.json`` under the cache
root, written by every finished cell; a cell with no remembered rate says that the time
left shows after its first batch (the progress bar measures it there).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from ..models.cache import cache_root, write_json_atomic

# A run on CPU estimated above this many seconds gets the hint to use --max-tokens.
LONG_ON_CPU_SECONDS = 300
# Below this many tokens to score, a cell is quick anywhere: no line is printed.
QUIET_BELOW_TOKENS = 50_000
QUICK_LOOK_TOKENS = 16_384


def _rates_path() -> Path:
    return cache_root() / "rates.json"


def _key(device: str, model: str, pattern: str, ctx: int) -> str:
    return f"{device} | {model} | {pattern} | ctx {ctx}"


def remembered_rate(device: str, model: str, pattern: str, ctx: int) -> float | None:
    try:
        rate = json.loads(_rates_path().read_text(encoding="utf-8")).get(_key(device, model, pattern, ctx))
    except (OSError, ValueError, AttributeError):
        return None
    return float(rate) if isinstance(rate, (int, float)) and rate > 0 else None


def remember_rate(device: str, model: str, pattern: str, ctx: int, tokens_per_second: float | None) -> None:
    """Keep the rate of a finished cell; a cache that cannot be written is not an error."""
    if not tokens_per_second:
        return
    path = _rates_path()
    try:
        rates = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if not isinstance(rates, dict):
            rates = {}
        rates[_key(device, model, pattern, ctx)] = round(float(tokens_per_second), 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, rates)
    except (OSError, ValueError):
        pass


def estimate_line(label: str, tokens: int, windows: int, documents: int, *, rate: float | None,
                  on_cpu: bool) -> str | None:
    """One line about a cell's size and cost, or None for a quick cell."""
    if tokens < QUIET_BELOW_TOKENS:
        return None
    size = f"{label}: {tokens:,} tokens to score in {windows:,} windows of {documents} document" \
           f"{'s' * (documents != 1)}"
    if rate is None:
        line = f"{size}; the time left shows after the first batch"
        long_on_cpu = on_cpu
    else:
        seconds = tokens / rate
        line = f"{size}; about {timedelta(seconds=round(seconds))} at {rate:,.0f} tok/s (last run on this device)"
        long_on_cpu = on_cpu and seconds > LONG_ON_CPU_SECONDS
    if long_on_cpu:
        line += f"; for a quick look add --max-tokens {QUICK_LOOK_TOKENS}"
    return line


def run_line(cells: list[tuple[int, float | None]], *, on_cpu: bool) -> str | None:
    """One line, before the first cell of a run of several, about the whole run: ``cells``
    holds each cell's tokens to score and its remembered rate (None when there is none)."""
    tokens = sum(n for n, _ in cells)
    if len(cells) < 2 or tokens < QUIET_BELOW_TOKENS:
        return None
    line = f"this run: {len(cells)} cells, {tokens:,} tokens to score"
    known = [(n, rate) for n, rate in cells if rate]
    if known:
        seconds = sum(n / rate for n, rate in known)
        if len(known) == len(cells):
            line += f"; about {timedelta(seconds=round(seconds))} in all (rates of earlier runs on this device)"
        else:
            line += (f"; about {timedelta(seconds=round(seconds))} for the {len(known)} cells with a rate from an "
                     f"earlier run on this device, the others show theirs after their first batch")
            seconds = None
        if on_cpu and seconds is not None and seconds > LONG_ON_CPU_SECONDS:
            line += f"; for a quick look add --max-tokens {QUICK_LOOK_TOKENS}"
    else:
        line += "; each cell's time shows after its first batch"
        if on_cpu:
            line += f" (on CPU a whole run can take long: --max-tokens {QUICK_LOOK_TOKENS} gives a quick look)"
    return line
