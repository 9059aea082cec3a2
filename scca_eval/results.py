"""Record files, under the name older imports use: they live in ``records/store.py``."""

from .records.store import (REQUIRED_KEYS, identity_tags, load_records, read_record, record_filename, slug,
                            write_record)

__all__ = ["REQUIRED_KEYS", "identity_tags", "load_records", "read_record", "record_filename", "slug",
           "write_record"]
