"""Benchmarks: attention alone per pattern, and whole-model evaluation throughput.

``attention_bench`` times each pattern's fast paths against SDPA causal
attention; ``model_bench`` times the evaluation engine against a plain
transformers loop on a model of a named shape (random weights) or a real one.
Both return plain dicts (JSON-ready) and have a markdown renderer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_write_text

from .attention import attention_bench, best_rows, markdown_attention, pattern_from_label
from .model import SHAPES, markdown_model, model_bench, random_model

__all__ = [
    "SHAPES",
    "attention_bench",
    "best_rows",
    "markdown_attention",
    "markdown_model",
    "model_bench",
    "pattern_from_label",
    "random_model",
    "write_json",
    "write_outputs",
]


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write a benchmark result atomically (a temporary file renamed into place)."""
    atomic_write_text(Path(path), json.dumps(result, indent=2, default=str) + "\n")


def write_outputs(result: dict, markdown: str, json_path: str | None = None,
                  markdown_path: str | None = None, say=print) -> None:
    """Print the table, and write the result as JSON and the table as markdown where asked."""
    say(markdown)
    if json_path:
        write_json(result, json_path)
        say(f"wrote {json_path}")
    if markdown_path:
        atomic_write_text(Path(markdown_path), markdown)
        say(f"wrote {markdown_path}")
