"""Attention patterns: head rules, presets, the pattern syntax and the dense reference mask."""

from .masks import build_mask, density, render_rule, rule_mask, save_png
from .parse import check_against_ctx, parse_mix, parse_rule, preset_names, resolve_pattern
from .presets import PRESET_DESCRIPTIONS, preset
from .rules import RULE_KINDS, Rule
from .spec import PatternSpec

__all__ = [
    "PRESET_DESCRIPTIONS",
    "RULE_KINDS",
    "PatternSpec",
    "Rule",
    "build_mask",
    "check_against_ctx",
    "density",
    "parse_mix",
    "parse_rule",
    "preset",
    "preset_names",
    "render_rule",
    "resolve_pattern",
    "rule_mask",
    "save_png",
]
