"""Attention patterns: head rules, presets and the dense reference mask."""

from .presets import PRESET_DESCRIPTIONS, preset
from .rules import Rule
from .spec import PatternSpec

__all__ = ["PRESET_DESCRIPTIONS", "PatternSpec", "Rule", "preset"]
