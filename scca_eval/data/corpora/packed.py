"""A corpus as token ids in one compressed file, for machines that train without the texts.

The file is an xz stream (Python's ``lzma``) of: the line ``scca-eval packed tokens``, an
8-byte little-endian header length, the header (JSON: corpus, tokenizer fingerprint, per
split the documents' ids, token counts, bytes, words and text digests, and the SHA-256 of
each split's ids), then every document's ids as little-endian uint16 (SmolLM2's 49,152
ids fit), split by split. A task read from it is the task read from the texts: the same
document ids and the same data fingerprint (the header keeps the digests it is made of),
so training records and resumed runs match whichever a machine had.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...files import atomic_path, atomic_write
from . import packed_path, read_manifest

MAGIC = b"scca-eval packed tokens\n"
FORMAT = 1


@dataclass
class PackedDocument:
    id: str
    ids: np.ndarray   # uint16
    bytes: int
    words: int
    digest: str       # hex SHA-256 of the document's id and text, as the token cache keys it


def split_sha256(documents: list[PackedDocument]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(np.asarray(doc.ids, dtype="<u2").tobytes())
    return digest.hexdigest()


def write(path: Path, corpus: str, tokenizer_fingerprint: str, splits: dict[str, list[PackedDocument]]) -> None:
    """Write the packed file (atomically)."""
    header = {
        "format": FORMAT, "corpus": corpus, "tokenizer_fingerprint": tokenizer_fingerprint,
        "splits": {name: {"ids_sha256": split_sha256(docs),
                          "documents": [{"id": d.id, "tokens": int(len(d.ids)), "bytes": d.bytes, "words": d.words,
                                         "digest": d.digest} for d in docs]}
                   for name, docs in splits.items()},
    }
    encoded = json.dumps(header, sort_keys=True).encode("utf-8")

    def fill(handle) -> None:
        with lzma.open(handle, "wb", format=lzma.FORMAT_XZ, preset=9) as out:
            out.write(MAGIC + len(encoded).to_bytes(8, "little") + encoded)
            for docs in splits.values():
                for doc in docs:
                    out.write(np.asarray(doc.ids, dtype="<u2").tobytes())

    atomic_write(path, fill)


def read(path: Path) -> tuple[dict, dict[str, list[PackedDocument]]]:
    """The header and the documents of a packed file, checked against its own checksums."""
    try:
        data = lzma.decompress(Path(path).read_bytes())
    except (OSError, lzma.LZMAError, EOFError) as error:
        raise UserError(f"{path}: not a readable packed token file ({error}); copy it again") from None
    if not data.startswith(MAGIC):
        raise UserError(f"{path}: not a scca-eval packed token file; make one with 'scca-eval tasks pack'")
    start = len(MAGIC) + 8
    length = int.from_bytes(data[len(MAGIC):start], "little")
    try:
        header = json.loads(data[start:start + length])
    except ValueError:
        raise UserError(f"{path}: its header is damaged; copy the file again") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: packed format {header.get('format')} is not {FORMAT}; pack it with this version")
    ids = np.frombuffer(data, dtype="<u2", offset=start + length)
    splits, position = {}, 0
    for name, split in header["splits"].items():
        docs = []
        for entry in split["documents"]:
            docs.append(PackedDocument(entry["id"], ids[position:position + entry["tokens"]], entry["bytes"],
                                       entry["words"], entry["digest"]))
            position += entry["tokens"]
        if split_sha256(docs) != split["ids_sha256"]:
            raise UserError(f"{path}: the token ids of split {name} do not match their checksum; copy the file again")
        splits[name] = docs
    if position != len(ids):
        raise UserError(f"{path}: {len(ids) - position} token ids more than the header lists; copy the file again")
    return header, splits


_last_read: dict = {}


def read_cached(path: Path) -> tuple[dict, dict[str, list[PackedDocument]]]:
    """:func:`read`, once per file version in a process (a run reads several splits)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _last_read:
        _last_read.clear()
        _last_read[key] = read(path)
    return _last_read[key]


def check_against_manifest(header: dict, where: Path) -> None:
    """A packed file of a corpus must hold the documents its committed manifest lists."""
    manifest = read_manifest(header["corpus"])
    if header["tokenizer_fingerprint"] != manifest["tokenizer"]["fingerprint"]:
        return  # ids of another tokenizer: only their own checksums apply
    for name, split in manifest["splits"].items():
        packed = header["splits"].get(name)
        if packed is None or packed["ids_sha256"] != split["ids_sha256"]:
            raise UserError(f"{where}: split {name} is not the {header['corpus']} corpus this scca-eval records "
                            "(its token ids differ from the manifest's); build and pack it with this version")


def unpack(file: Path) -> Path:
    """Check a packed file and put it where the corpus's tasks find it; returns that path."""
    header, _ = read(file)
    check_against_manifest(header, file)
    target = packed_path(header["corpus"])
    with atomic_path(target) as partial:
        shutil.copyfile(file, partial)
    return target
