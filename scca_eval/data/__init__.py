"""Tasks, their documents, and their token ids.

``load_task(name_or_path)`` / ``task_from_data_path(path)`` give a :class:`TaskSpec`;
``tokenize_task(task, tokenizer)`` gives a :class:`TokenizedTask` (cached on disk per
tokenizer and data). See ``tasks.py`` for the task file format.
"""

from .sources import Document, read_documents
from .tasks import (
    Selection,
    SourceSpec,
    TaskSpec,
    bundled_tasks_dir,
    list_tasks,
    load_task,
    task_from_data_path,
)
from .tokens import (
    TokenizedDoc,
    TokenizedTask,
    count_bytes,
    count_words,
    default_cache_dir,
    tokenize_task,
    tokenizer_fingerprint,
)

__all__ = [
    "Document",
    "Selection",
    "SourceSpec",
    "TaskSpec",
    "TokenizedDoc",
    "TokenizedTask",
    "bundled_tasks_dir",
    "count_bytes",
    "count_words",
    "default_cache_dir",
    "list_tasks",
    "load_task",
    "read_documents",
    "task_from_data_path",
    "tokenize_task",
    "tokenizer_fingerprint",
]
