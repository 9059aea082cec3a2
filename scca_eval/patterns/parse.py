"""Turn what a user writes into a validated :class:`PatternSpec`.

A pattern is either a preset name (``s2``, ``SCCA-fixed``, ...) or a custom mix
of head rules, written as text or as a YAML list (docs/patterns.md, "Writing
your own mix")::

    1/2 local + 1/2 shifted
    1/4 local + 1/4 cross(1) + 1/2 dilated(2,0)
    0.5 causal + 0.5 shifted(64)
    [{share: 1/2, rule: local}, {share: 1/2, rule: cross(1)}]

Shares are exact fractions (``1/3``) or decimals (``0.25``), read with
:class:`fractions.Fraction` so that they sum to exactly 1. Every mistake raises
:class:`~scca_eval.errors.UserError` with one line that says what to fix.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Any

from ..errors import UserError
from .presets import PRESET_DESCRIPTIONS, preset
from .rules import RULE_KINDS, Rule
from .spec import DEFAULT_CHUNK_RATIO, PatternSpec

MIX_EXAMPLE = "'1/2 local + 1/2 shifted'"
# Said where a mix does not parse: a user who meant several patterns learns both list forms.
LIST_HINT = "several patterns: -p full,s2 or -p full -p s2"

# One term of a mix: an optional share, a rule name, optional parameters.
_TERM = re.compile(
    r"^(?P<share>\d+\s*/\s*\d+|\d*\.\d+|\d+)?\s*(?P<rule>[A-Za-z_]+)\s*(?:\((?P<args>[^()]*)\))?$"
)


def preset_names() -> list[str]:
    return list(PRESET_DESCRIPTIONS)


def _normalize_name(text: str) -> str:
    return text.strip().lower().replace("-", "_")


# -- small readers --------------------------------------------------------------
def _read_share(value: Any, where: str) -> Fraction:
    """A share as an exact fraction: 1/2, '0.25', 1, or a YAML float such as 0.5."""
    if isinstance(value, bool):
        raise UserError(f"{where}: share {value!r} is not a number; write it like 1/2 or 0.5")
    try:
        if isinstance(value, float):
            # str() gives the shortest decimal that round-trips, so 0.1 reads as 1/10.
            share = Fraction(str(value))
        elif isinstance(value, (int, Fraction)):
            share = Fraction(value)
        else:
            share = Fraction(str(value).replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{where}: share {value!r} is not a number; write it like 1/2 or 0.5") from None
    if share <= 0:
        raise UserError(f"{where}: share {share} must be above 0; drop the term instead")
    return share


def _read_int(text: str, what: str, where: str) -> int:
    text = text.strip()
    if not re.fullmatch(r"-?\d+", text):
        raise UserError(f"{where}: {what} {text!r} must be a whole number")
    return int(text)


def parse_rule(text: str, where: str = "pattern") -> Rule:
    """Read one rule: causal, local, shifted, shifted(s), cross, cross(d), dilated(r,j)."""
    match = _TERM.match(text.strip())
    if not match or match.group("share"):
        raise UserError(f"{where}: cannot read the rule {text.strip()!r}; write e.g. local, cross(1) or dilated(2,0)")
    return _build_rule(match.group("rule"), match.group("args"), where)


def _build_rule(name: str, args_text: str | None, where: str) -> Rule:
    kind = name.lower()
    if kind not in RULE_KINDS:
        raise UserError(f"{where}: unknown rule {name!r}; the rules are {', '.join(RULE_KINDS)}")
    args = [] if args_text is None or not args_text.strip() else args_text.split(",")
    label = f"{kind}({args_text})" if args_text is not None else kind

    def expect(count: tuple[int, ...], form: str) -> list[int]:
        if len(args) not in count:
            raise UserError(f"{where}: {label} takes {form}")
        return [_read_int(arg, "parameter", f"{where}: {label}") for arg in args]

    if kind in ("causal", "local"):
        expect((0,), "no parameters")
        return Rule(kind)
    if kind == "shifted":
        values = expect((0, 1), "at most one parameter, the shift in tokens: shifted or shifted(64)")
        if not values:
            return Rule("shifted")  # half a chunk
        if values[0] < 0:
            raise UserError(f"{where}: {label}: the shift must be 0 or more tokens")
        return Rule("shifted", shift=values[0])
    if kind == "cross":
        values = expect((0, 1), "at most one parameter, the distance in chunks: cross(1)")
        distance = values[0] if values else 1
        if distance < 0:
            raise UserError(f"{where}: {label}: the distance must be 0 or more chunks")
        return Rule("cross", distance=distance)
    # dilated
    rate, offset = expect((2,), "two parameters, the rate r and the offset j: dilated(2,0)")
    if rate < 1:
        raise UserError(f"{where}: {label}: the rate r must be 1 or more")
    if not 0 <= offset < rate:
        raise UserError(f"{where}: {label}: the offset j must be in 0..{rate - 1} (0..r-1)")
    return Rule("dilated", rate=rate, offset=offset)


def _check_total(groups: list[tuple[Fraction, Rule]], where: str) -> None:
    total = sum((share for share, _ in groups), Fraction(0))
    if total < 1:
        raise UserError(f"{where}: the shares sum to {total}, not 1, so some heads would have no rule; "
                        f"make them sum to exactly 1")
    if total > 1:
        raise UserError(f"{where}: the shares sum to {total}, not 1; make them sum to exactly 1")


# -- mixes ----------------------------------------------------------------------
def parse_mix(text: str) -> tuple[tuple[Fraction, Rule], ...]:
    """Read a custom mix such as ``1/4 local + 1/4 cross(1) + 1/2 dilated(2,0)``."""
    where = f"pattern {text.strip()!r}"
    terms = [term.strip() for term in text.split("+")]
    if any(not term for term in terms):
        raise UserError(f"{where}: empty term around '+'; write it like {MIX_EXAMPLE}")
    groups: list[tuple[Fraction, Rule]] = []
    for term in terms:
        match = _TERM.match(term)
        if not match:
            what = "it" if len(terms) == 1 else repr(term)
            raise UserError(f"{where}: cannot read {what}; write each term as a share and a rule, "
                            f"like {MIX_EXAMPLE} ({LIST_HINT})")
        share_text = match.group("share")
        if share_text is None:
            if len(terms) > 1:
                raise UserError(f"{where}: {term!r} has no share; give each term one, like {MIX_EXAMPLE}")
            share = Fraction(1)  # a lone rule is the whole pattern
        else:
            share = _read_share(share_text, where)
        groups.append((share, _build_rule(match.group("rule"), match.group("args"), where)))
    _check_total(groups, where)
    return tuple(groups)


def parse_group_list(items: list) -> tuple[tuple[Fraction, Rule], ...]:
    """Read the YAML form: ``[{share: 1/2, rule: local}, {share: 1/2, rule: shifted}]``."""
    where = "pattern list"
    if not items:
        raise UserError(f"{where}: empty; give at least one {{share: ..., rule: ...}} entry")
    groups: list[tuple[Fraction, Rule]] = []
    for index, item in enumerate(items):
        here = f"{where} entry {index + 1}"
        if not isinstance(item, dict):
            raise UserError(f"{here}: expected a mapping like {{share: 1/2, rule: local}}, got {item!r}")
        unknown = sorted(set(map(str, item)) - {"share", "rule"})
        if unknown:
            raise UserError(f"{here}: unknown field {unknown[0]!r}; the fields are share and rule")
        if "share" not in item or "rule" not in item:
            missing = "share" if "share" not in item else "rule"
            raise UserError(f"{here}: missing field {missing!r}; write it like {{share: 1/2, rule: local}}")
        if not isinstance(item["rule"], str):
            raise UserError(f"{here}: rule {item['rule']!r} must be text like local or cross(1)")
        groups.append((_read_share(item["share"], here), parse_rule(item["rule"], here)))
    _check_total(groups, where)
    return tuple(groups)


# -- settings -------------------------------------------------------------------
def _check_positive_int(value: Any, option: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{option} {value!r} is not a whole number; give {what}")
    if value < 1:
        raise UserError(f"{option} {value} is below 1; give {what}")
    return value


def _read_ratio(value: Any) -> Fraction:
    try:
        ratio = Fraction(str(value).replace(" ", "")) if not isinstance(value, Fraction) else value
    except (ValueError, ZeroDivisionError):
        raise UserError(f"chunk ratio {value!r} is not a number; give a fraction like 1/4") from None
    if not 0 < ratio <= 1:
        raise UserError(f"chunk ratio {ratio} must be above 0 and at most 1, e.g. 1/4")
    return ratio


def resolve_pattern(text: str | list | PatternSpec, chunk_size: int | None = None,
                    dilation: int | None = None, chunk_ratio: Any = None) -> PatternSpec:
    """A preset name, a custom mix (text or YAML list) or a spec -> a validated spec.

    chunk_size:  G in tokens (fixed for every window length); default ``ctx/4``.
    chunk_ratio: G as a share of the window length when chunk_size is not given.
    dilation:    the r of ``sda`` (default 2); other patterns do not use it.

    Full attention has no chunks: it drops a chunk size or ratio given to a whole run (``--pattern
    full,s2 --chunk-size 1024``), so that its records stay those of full attention.
    """
    spec = _resolve_pattern(text, chunk_size, dilation, chunk_ratio)
    if spec.is_full:
        spec = dataclasses.replace(spec, chunk_size=None, chunk_ratio=DEFAULT_CHUNK_RATIO)
    return spec


def _resolve_pattern(text, chunk_size, dilation, chunk_ratio) -> PatternSpec:
    if chunk_size is not None:
        _check_positive_int(chunk_size, "--chunk-size", "a chunk size of at least 1 token")
    if dilation is not None:
        _check_positive_int(dilation, "--dilation", "a dilation rate of at least 1")
    ratio = None if chunk_ratio is None else _read_ratio(chunk_ratio)

    if isinstance(text, PatternSpec):
        spec = text
        if chunk_size is not None:
            spec = dataclasses.replace(spec, chunk_size=chunk_size)
        if ratio is not None:
            spec = dataclasses.replace(spec, chunk_ratio=ratio)
        if dilation is not None and spec.name == "sda":
            spec = preset("sda", chunk_size=spec.chunk_size, chunk_ratio=spec.chunk_ratio, dilation=dilation)
        return spec

    settings: dict[str, Any] = {"chunk_size": chunk_size}
    if ratio is not None:
        settings["chunk_ratio"] = ratio

    if isinstance(text, (list, tuple)):
        groups = parse_group_list(list(text))
        return PatternSpec("custom", groups, source=_list_source(groups), **settings)
    if not isinstance(text, str):
        raise UserError(f"pattern {text!r} must be a preset name or a mix like {MIX_EXAMPLE}")
    if not text.strip():
        raise UserError(f"empty pattern; choose one of {', '.join(preset_names())} or write a mix like {MIX_EXAMPLE}")

    name = _normalize_name(text)
    if name in PRESET_DESCRIPTIONS:
        spec = preset(name, dilation=dilation, **settings)
        return dataclasses.replace(spec, source=text.strip())
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in RULE_KINDS:
        raise UserError(f"unknown pattern {text.strip()!r}; choose one of {', '.join(preset_names())} "
                        f"or write a mix like {MIX_EXAMPLE}")
    groups = parse_mix(text)
    return PatternSpec("custom", groups, source=text.strip(), **settings)


def _list_source(groups) -> str:
    return " + ".join(f"{share} {rule.label()}" for share, rule in groups)


def check_against_ctx(spec: PatternSpec, ctx: int) -> None:
    """Refuse a fixed chunk size longer than the evaluation window."""
    if spec.chunk_size is not None and spec.chunk_size > ctx:
        raise UserError(f"--chunk-size {spec.chunk_size} is above ctx {ctx}; "
                        f"give a chunk size between 1 and {ctx}")


def pattern_from_dict(data: dict) -> PatternSpec:
    """The inverse of :meth:`PatternSpec.to_dict` (a record's ``config.pattern``, or the
    pattern a model carries in its config): the same spec, equal to the one written."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise UserError(f"stored pattern {data!r} is not a pattern's settings (name, groups, chunk_size, ...)")
    settings = {"chunk_size": data.get("chunk_size"), "chunk_ratio": _read_ratio(data.get("chunk_ratio", "1/4"))}
    if data["name"] in PRESET_DESCRIPTIONS:
        return preset(data["name"], dilation=data.get("dilation"), **settings)
    if str(data.get("groups", "")).startswith("flow:"):  # a flow spec under a name of its own
        return PatternSpec(data["name"], flow=True, dilation=data.get("dilation"), **settings)
    groups = parse_mix(str(data.get("groups", "")))
    return PatternSpec(data["name"], groups, dilation=data.get("dilation"), source=_list_source(groups), **settings)
