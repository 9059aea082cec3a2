"""Benchmarks: attention alone per pattern, and whole-model evaluation throughput.

``attention_bench`` times each pattern's fast paths against SDPA causal
attention; ``model_bench`` times the evaluation engine against a plain
transformers loop on a model of a named shape (random weights) or a real one.
Both return plain dicts (JSON-ready) and have a markdown renderer.
"""

from __future__ import annotations

import json
import os
import tempfile

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
]


def write_json(result: dict, path: str | os.PathLike) -> None:
    """Write a benchmark result atomically (a temporary file renamed into place)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(handle.name, path)
