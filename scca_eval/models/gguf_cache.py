"""GGUF files: validate them, convert them once, and cache the converted model.

transformers reads a GGUF file by dequantizing every tensor in Python, which is slow
(tens of seconds for SmolLM2-135M). It is done once per file content: the dequantized fp32
model and its tokenizer are saved with ``save_pretrained`` (safetensors) under
``<cache>/models/<name>-<first 16 hex of the file's SHA-256>/`` and later runs load
that folder in about a second. The saved values are the dequantized fp32 values
themselves, so the cached model gives exactly the logits of the GGUF-loaded one.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from ..errors import MissingDependency, UserError
from .cache import exclusive_lock, models_cache_dir, publish_folder, write_json_atomic
from .fingerprint import file_digest

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Written last into a converted folder; says where the weights came from.
SOURCE_FILE = "scca-eval-source.json"


def require_gguf_support() -> None:
    """transformers needs ``gguf`` (the reader) and ``accelerate`` to load a GGUF file."""
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise MissingDependency(package, "gguf", "Loading a GGUF model")


def check_gguf_file(path: Path) -> None:
    """Cheap checks that ``path`` can be a GGUF file at all (the full check is on conversion)."""
    if not path.exists():
        raise UserError(f"GGUF file {path} does not exist: check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file: --model takes a .gguf file, a model folder or a hub id")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        if len(magic) < 4:
            raise UserError(f"GGUF file {path} is empty or truncated: download it again")
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'): check the path")


def gguf_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable GGUF file, or None when it reads fine.

    Uses the ``gguf`` package's reader, which checks that every tensor's data lies
    inside the file. It takes several seconds, so it runs only to explain a failed
    conversion.
    """
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, IndexError, ... on bad files
        return _one_line(error)
    return None


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def gguf_sha256(path: Path) -> str:
    """Full SHA-256 of a GGUF file (remembered per path, size and mtime)."""
    digest, _ = file_digest(path, full=True)
    return digest


def converted_gguf_folder(path: Path, cache_name: str | None = None) -> tuple[Path, str]:
    """The converted copy of the GGUF file at ``path``, made on first use.

    Returns ``(folder, sha256 of the GGUF file)``. Raises :class:`UserError` for a
    corrupt or truncated file, :class:`MissingDependency` when ``gguf``/``accelerate``
    are missing.
    """
    path = Path(path)
    check_gguf_file(path)
    sha = gguf_sha256(path)
    name = _slug(cache_name or path.stem)
    folder = models_cache_dir() / f"{name}-{sha[:16]}"
    if (folder / SOURCE_FILE).is_file():
        return folder, sha
    require_gguf_support()
    try:
        with exclusive_lock(folder.parent / f".{folder.name}.lock"):
            if (folder / SOURCE_FILE).is_file():  # another process converted it while we waited
                return folder, sha
            logger.info("Converting %s once; later runs load it from %s", path.name, folder)
            with publish_folder(folder) as partial:
                _convert(path, partial)
                write_json_atomic(
                    partial / SOURCE_FILE,
                    {
                        "gguf_file": path.name,
                        "gguf_sha256": sha,
                        "gguf_bytes": path.stat().st_size,
                        "dtype": "float32",
                        "transformers": _transformers_version(),
                    },
                )
    except OSError as error:  # _convert turns its own failures into UserError; this is the cache itself
        raise UserError(
            f"cannot write the converted model to {folder.parent} ({_one_line(error)}): "
            "set SCCA_EVAL_CACHE to a writable folder with about 4x the GGUF file's size free"
        ) from None
    return folder, sha


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _convert(path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # readers of a damaged file fail in many ways (struct.error, ValueError, ...)
        problem = gguf_problem(path)
        if problem is not None:
            raise UserError(
                f"GGUF file {path} is corrupt or truncated ({problem}): download it again"
            ) from error
        raise UserError(f"cannot load GGUF file {path}: {_one_line(error)}") from error
    # A GGUF-loaded model carries a GGUF "quantizer" although its weights are plain
    # dequantized tensors; save_pretrained refuses to save it until both are cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
