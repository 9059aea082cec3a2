"""Reading the documents of a task's source: text files, JSON lines, parquet, the hub, token streams.

Every reader returns documents in a fixed order (files by relative path, records in file
order) so that a task always means the same data, and turns every problem with the data
into a one-line :class:`UserError` that names the file.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import MissingDependency, UserError
from .tasks import SourceSpec, TaskSpec, is_jsonl_file, visible_files


@dataclass(frozen=True)
class Document:
    """One document: an id unique within its task, and its text."""

    id: str
    text: str


def read_documents(task: TaskSpec) -> list[Document]:
    """The task's documents in source order (only the first ``limit_documents`` are read)."""
    source = task.source
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hub": _read_hub,
               "built": _read_built}
    if source.type not in readers:
        raise UserError(f"{task.label}: source type {source.type!r} holds token ids, not text; "
                        "use read_token_stream for it")
    limit = task.selection.limit_documents
    documents = []
    for document in readers[source.type](task):
        documents.append(document)
        if limit is not None and len(documents) >= limit:
            break
    if not documents:
        raise UserError(f"{task.label}: the source holds no documents; point it at files with text in them")
    return _unique_ids(documents)


def _unique_ids(documents: list[Document]) -> list[Document]:
    """Ids are matched across runs (paired comparisons): make repeats unique, deterministically."""
    taken = {doc.id for doc in documents}
    seen: set[str] = set()
    out = []
    for doc in documents:
        if doc.id not in seen:
            seen.add(doc.id)
            out.append(doc)
            continue
        count = 2
        while f"{doc.id} #{count}" in taken:
            count += 1
        new_id = f"{doc.id} #{count}"
        taken.add(new_id)
        seen.add(new_id)
        out.append(Document(new_id, doc.text))
    return out


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                        "convert it to UTF-8 or leave it out of the data") from None


# ---------------------------------------------------------------- plain text

def text_files(source: SourceSpec) -> list[tuple[str, Path]]:
    """The (document id, file) pairs of a text source, in document order."""
    path = source.path
    if path.is_file():
        return [(path.name, path)]
    files = sorted(
        (p for p in path.glob(source.glob)
         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    return [(p.relative_to(path).as_posix(), p) for p in files]


def _read_text(task: TaskSpec) -> Iterator[Document]:
    files = text_files(task.source)
    if not files:
        raise UserError(f"{task.label}: no files under {task.source.path} match '{task.source.glob}'; "
                        "put text files (one document each) there or fix 'glob'")
    for doc_id, path in files:
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
        if path.name.endswith(".gz"):
            # A compressed document is the same document: its id leaves out the ".gz".
            data = _gunzip(data, path)
            doc_id = doc_id[: -len(".gz")]
        yield Document(doc_id, _decode(data, str(path)))


def _read_built(task: TaskSpec) -> Iterator[Document]:
    """A built corpus's split: its text files (see ``corpora/``)."""
    from .corpora import not_built_error, packed_path, texts_dir

    folder = texts_dir(task.source.corpus, task.source.split)
    if not folder.is_dir():
        if packed_path(task.source.corpus).is_file():
            raise UserError(f"{task.name}: this machine has its token ids, not its text (imported with "
                            f"'scca-eval tasks unpack'); build it with 'scca-eval tasks build {task.source.corpus}' "
                            "to read the text")
        raise not_built_error(task.name, task.source.corpus)
    yield from _read_text(replace(task, source=SourceSpec(type="text", path=folder)))


def _gunzip(data: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: cannot be decompressed ({error}); the file may be truncated or not gzip "
                        "(give plain text, or gzip it again)") from None


# ---------------------------------------------------------------- JSON lines and parquet

def _data_files(task: TaskSpec, accept, kind: str) -> list[Path]:
    path = task.source.path
    if path.is_file():
        return [path]
    files = [p for p in visible_files(path) if accept(p)]
    if not files:
        raise UserError(f"{task.label}: no {kind} files under {path}; put some there or fix source.path")
    return files


def _record_text(record, task: TaskSpec, where: str) -> tuple[str, str | None]:
    source = task.source
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}; "
                        "write one object per line")
    if source.text_field not in record:
        fields = ", ".join(list(record)[:8]) or "none"
        raise UserError(f"{where}: no field '{source.text_field}' (fields: {fields}); "
                        "set text_field in the task to the field that holds the text")
    text = record[source.text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field '{source.text_field}' is {type(text).__name__}, not text; "
                        "set text_field to a text field")
    doc_id = None
    if source.id_field is not None:
        if source.id_field not in record:
            raise UserError(f"{where}: no field '{source.id_field}' for the document id; "
                            "fix id_field or leave it out (ids are then file:line)")
        doc_id = str(record[source.id_field])
    return text, doc_id


def _file_label(task: TaskSpec, path: Path) -> str:
    """How document ids name a data file: its path inside the source folder, or its name."""
    root = task.source.path
    return path.relative_to(root).as_posix() if root.is_dir() else path.name


def _read_jsonl(task: TaskSpec) -> Iterator[Document]:
    for path in _data_files(task, is_jsonl_file, "JSON lines (.jsonl, .jsonl.gz)"):
        label = _file_label(task, path)
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    where = f"{path}, line {number}"
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(_decode(line, where))
                    except json.JSONDecodeError as error:
                        raise UserError(f"{where}: not valid JSON ({error.msg}); fix or remove the line") from None
                    text, doc_id = _record_text(record, task, where)
                    yield Document(doc_id if doc_id is not None else f"{label}:{number}", text)
        except (OSError, EOFError, zlib.error) as error:
            raise UserError(f"{path}: cannot be read ({error}); the file may be truncated or not gzip") from None


def _read_parquet(task: TaskSpec) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency("pyarrow", "parquet", "Reading .parquet files") from None
    source = task.source
    for path in _data_files(task, lambda p: p.suffix == ".parquet", "parquet"):
        label = _file_label(task, path)
        try:
            parquet = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises its own exception types for broken files
            raise UserError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]}); "
                            "check the file") from None
        columns = parquet.schema_arrow.names
        wanted = [source.text_field] + ([source.id_field] if source.id_field else [])
        for column in wanted:
            if column not in columns:
                raise UserError(f"{path}: no column '{column}' (columns: {', '.join(columns[:8])}); "
                                "set text_field / id_field in the task")
        row = 0
        for batch in parquet.iter_batches(columns=wanted, batch_size=256):
            data = batch.to_pydict()
            for i, text in enumerate(data[source.text_field]):
                where = f"{path}, row {row}"
                if not isinstance(text, str):
                    raise UserError(f"{where}: column '{source.text_field}' holds {type(text).__name__}, "
                                    "not text; set text_field to a text column")
                doc_id = str(data[source.id_field][i]) if source.id_field else f"{label}:{row}"
                yield Document(doc_id, text)
                row += 1


# ---------------------------------------------------------------- the dataset hub

_CONNECTION_WORDS = ("connect", "offline", "timeout", "network", "resolve", "unreachable", "name or service")


def _looks_offline(error: BaseException) -> bool:
    seen = error
    while seen is not None:
        text = f"{type(seen).__name__} {seen}".lower()
        if isinstance(seen, (ConnectionError, TimeoutError)) or any(w in text for w in _CONNECTION_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _hub_dataset(source: SourceSpec):
    try:
        import datasets
    except ImportError:
        raise MissingDependency("datasets", "hub", "Reading a dataset from the hub") from None
    if source.data_files:
        # Read the files with datasets' own parquet/json readers: this works for every
        # repository, also those that still carry a loading script (which current
        # `datasets` refuses to run).
        first = source.data_files[0]
        if first.endswith(".parquet"):
            builder = "parquet"
        elif first.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            builder = "json"
        else:
            raise UserError(f"hub data_files {first!r}: only .parquet and .jsonl(.gz) files can be read; "
                            "list parquet or JSON-lines files")
        at = f"@{source.revision}" if source.revision else ""
        urls = [f"hf://datasets/{source.dataset}{at}/{name}" for name in source.data_files]
        return datasets.load_dataset(builder, data_files={source.split: urls}, split=source.split,
                                     streaming=source.streaming)
    return datasets.load_dataset(source.dataset, source.config, split=source.split,
                                 revision=source.revision, streaming=source.streaming)


def _read_hub(task: TaskSpec) -> Iterator[Document]:
    source = task.source
    where = f"{task.label}: hub dataset {source.dataset} ({source.split})"
    offline_hint = ("to run offline, download the data once and point the task at the local copy: "
                    "scca-eval ppl --data PATH, or a source of type jsonl/parquet/text with a local path "
                    "in the task file")
    try:
        for index, record in enumerate(_hub_dataset(source)):
            text, doc_id = _record_text(record, task, f"{where}, record {index}")
            yield Document(doc_id if doc_id is not None else f"{source.split}:{index}", text)
    except (UserError, GeneratorExit):
        raise
    except Exception as error:  # datasets / huggingface_hub / fsspec raise many types
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        if _looks_offline(error):
            raise UserError(f"{where}: cannot reach the hub and the data is not cached ({first_line}); "
                            f"{offline_hint}") from None
        raise UserError(f"{where}: cannot be read ({type(error).__name__}: {first_line}); check the dataset, "
                        f"split and data_files in the task, or {offline_hint}") from None


# ---------------------------------------------------------------- LongLoRA token streams

def read_token_stream(task: TaskSpec) -> np.memmap:
    """LongLoRA's flat uint16 token stream (read-only memory map), checked for shape."""
    path = task.source.path
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: the token file is empty; give a LongLoRA .bin file with token ids")
    if size % 2:
        raise UserError(f"{path}: {size} bytes is not a whole number of uint16 token ids; "
                        "the file is truncated or not a LongLoRA .bin file")
    return np.memmap(path, dtype=np.uint16, mode="r")


def iter_file_chunks(path: Path, chunk_size: int = 1 << 24) -> Iterable[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            yield chunk
