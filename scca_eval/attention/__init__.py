"""Attention under a pattern: dense reference, fast paths, transformers registration."""

from .chunked import chunked_pattern_attention
from .dispatch import BACKENDS, call_counts, pattern_attention, reset_call_counts, resolve_backend
from .packed import packed_pattern_attention
from .reference import masked_attention
from .register import apply_pattern, check_architecture, pattern_of
from .strided import strided_pattern_attention

__all__ = [
    "BACKENDS",
    "apply_pattern",
    "call_counts",
    "check_architecture",
    "chunked_pattern_attention",
    "masked_attention",
    "packed_pattern_attention",
    "pattern_attention",
    "pattern_of",
    "reset_call_counts",
    "resolve_backend",
    "strided_pattern_attention",
]
