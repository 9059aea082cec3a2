"""Loading models for evaluation: the embedded default, HF folders, GGUF files, hub ids,
LoRA adapters (with LongLoRA's trainable_params.bin) and RoPE position interpolation."""

from .cache import cache_root, models_cache_dir
from .default_model import default_gguf_path
from .loading import load_model, model_record, parse_device, parse_dtype, trained_length
from .rope import parse_rope_scaling

__all__ = [
    "cache_root",
    "default_gguf_path",
    "load_model",
    "model_record",
    "models_cache_dir",
    "parse_device",
    "parse_dtype",
    "parse_rope_scaling",
    "trained_length",
]
