"""Records: what every record kind holds, what makes two cells the same, and their files.

One place for the records of every kind: perplexity cells (stride, lm-eval and LongLoRA
protocols), passkey cells, and ``training.json`` of a fine-tuning run. See README, "Record".

- ``identity.py``: record names and cell identities (``progress_key`` for resuming,
  ``config_key`` for reusing a stored record, ``comparison_key`` for ``compare``)
- ``build.py``: the builders, the one ``SCHEMA``, the device name, package versions
- ``store.py``: file names, atomic writing, reading, the records a folder already holds

Nothing here imports torch at import time.
"""

from .build import (SCHEMA, cell_config, determinism, device_name, longlora_record, model_dtype, new_record,
                    package_versions, passkey_config, passkey_record, peak_memory, runtime, training_record)
from .identity import (cell_identity, comparable_tokenizers, comparison_key, config_key, identity_difference, identity_of,
                       is_passkey_record, last_window_of, model_identity, passkey_identity, pattern_config,
                       pattern_identity, progress_key, record_identity, record_pattern_name, sweep_key)
from .store import (REQUIRED_KEYS, existing_records, identity_tags, load_records, read_record,
                    record_filename, record_path, slug, write_record, write_training_record)

__all__ = [
    "REQUIRED_KEYS", "SCHEMA", "cell_config", "cell_identity", "comparable_tokenizers", "comparison_key", "config_key",
    "determinism", "device_name", "existing_records", "identity_difference", "identity_of", "identity_tags",
    "is_passkey_record", "last_window_of", "load_records", "longlora_record", "model_dtype", "model_identity",
    "new_record", "package_versions", "passkey_config", "passkey_identity", "passkey_record", "pattern_config",
    "pattern_identity", "peak_memory", "progress_key", "read_record", "record_filename", "record_identity",
    "record_path", "record_pattern_name", "runtime", "slug", "sweep_key", "training_record", "write_record",
    "write_training_record",
]
