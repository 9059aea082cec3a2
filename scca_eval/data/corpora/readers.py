"""Text out of the formats Debian ships it in: R data, SWORD modules, dictd databases,
Info manuals, gzip-compressed files. Each reader is a pure function of the bytes, so a
build from the same packages gives the same text."""

from __future__ import annotations

import gzip
import html
import re
import struct
import zlib


def text_of(data: bytes, path: str) -> str:
    """A (possibly gzip-compressed) UTF-8 file as text with LF line ends; a few
    documentation files are Latin-1, read as such."""
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------- R data

def r_character_vector(blob: bytes) -> list[str]:
    """One R-serialized (XDR) character vector out of a lazy-load database (``Rdata.rdb``):
    a 4-byte length, then a zlib stream. janeaustenr stores a novel as its lines."""
    data = zlib.decompress(blob[4:])
    if data[:2] != b"X\n":
        raise ValueError("not an XDR-serialized R object")
    pos = 2
    version = struct.unpack(">i", data[pos:pos + 4])[0]
    pos += 12  # format version, R version, minimal R version
    if version == 3:
        encoding_length = struct.unpack(">i", data[pos:pos + 4])[0]
        pos += 4 + encoding_length
    flags, count = struct.unpack(">ii", data[pos:pos + 8])
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError("not a character vector")
    lines = []
    for _ in range(count):
        _, length = struct.unpack(">ii", data[pos:pos + 8])
        pos += 8
        lines.append(data[pos:pos + length].decode("utf-8"))
        pos += length
    return lines


# ---------------------------------------------------------------- SWORD modules

def sword_entries(files: dict[str, bytes], folder: str, four_byte_sizes: bool) -> list[str]:
    """The entries of a compressed SWORD Bible or commentary module (zText, zCom, zCom4), in
    index order. Each testament has a verse index (``.bzv``: block, offset, 2-byte size;
    ``.czv`` for zCom4: 4-byte size), a block index (``.bzs``/``.czs``: offset, compressed
    and plain size) and the zlib-compressed blocks (``.bzz``/``.czz``). Entries that a
    commentary links to several verses appear once."""
    prefix = "cz" if four_byte_sizes else "bz"
    verse_format = "<III" if four_byte_sizes else "<IIH"
    verse_size = struct.calcsize(verse_format)
    entries = []
    for testament in ("ot", "nt"):
        blocks_index = files[f"{folder}/{testament}.{prefix}s"]
        blocks = files[f"{folder}/{testament}.{prefix}z"]
        verses = files[f"{folder}/{testament}.{prefix}v"]
        block_table = [struct.unpack_from("<III", blocks_index, i) for i in range(0, len(blocks_index), 12)]
        current, plain, previous = None, b"", None
        for i in range(0, len(verses) - verse_size + 1, verse_size):
            block, offset, size = struct.unpack_from(verse_format, verses, i)
            if size == 0 or (block, offset) == previous:
                continue
            previous = (block, offset)
            if block != current:
                start, compressed, _ = block_table[block]
                plain, current = zlib.decompress(blocks[start:start + compressed]), block
            entries.append(plain[offset:offset + size].decode("utf-8"))
    return entries


_TAG = re.compile(r"<(/?)([A-Za-z]+)\b([^>]*?)(/?)>")
_NOTE = re.compile(r"<note\b[^>]*?/>|<note\b.*?</note>", re.S)
_NUMBER = re.compile(r'\bn="([^"]*)"')


def _osis_tag(match: re.Match) -> str:
    closing, name, attributes, self_closing = match.groups()
    if name == "chapter" and not closing and "eID" not in attributes:
        number = _NUMBER.search(attributes)
        return f"\n\nChapter {number.group(1)}\n\n" if number else "\n\n"
    if name in ("title", "p", "lg", "div"):
        return "\n\n" if not (name == "div" and "eID" in attributes) else ""
    if name in ("lb", "l", "row", "item", "list", "table"):
        return "\n"
    if name == "cell":
        return " "
    return ""  # words (with their Strong's numbers), emphasis, names: their text stays


def osis_to_text(entries: list[str]) -> str:
    """SWORD entries (OSIS markup) as plain text: titles, chapters and paragraphs on lines
    of their own, notes left out, everything else reduced to its words."""
    pieces = [html.unescape(_TAG.sub(_osis_tag, _NOTE.sub("", entry))) for entry in entries]
    return tidy_whitespace(" ".join(pieces))


def tidy_whitespace(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


# ---------------------------------------------------------------- dictd databases

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def dictd_text(dict_dz: bytes, index: bytes) -> str:
    """A dictd database (``.dict.dz`` is gzip-readable) as its entries in file order,
    without dictfmt's own ``00-database-*`` entries (the database's name, URL, format)."""
    data = gzip.decompress(dict_dz)
    spans = []
    for line in index.decode("utf-8").splitlines():
        headword, offset, length = line.rsplit("\t", 2)
        if not headword.startswith("00-database") and not headword.startswith("00database"):
            spans.append((_dictd_number(offset), _dictd_number(length)))
    entries = [data[start:start + length].decode("utf-8").strip("\n") for start, length in sorted(set(spans))]
    return "\n\n".join(entries) + "\n"


# ---------------------------------------------------------------- Info manuals

def info_text(parts: list[str]) -> str:
    """An Info manual (its parts in order) as text: the node separators, the ``File: …
    Node: …`` header lines, the directory entry and the tag table left out."""
    nodes = []
    for part in parts:
        for chunk in part.split("\x1f\n"):
            if chunk.startswith(("Tag Table:", "End Tag Table", "Indirect:", "Local Variables")):
                continue
            lines = chunk.split("\n")
            if lines and lines[0].startswith("File: "):
                lines = lines[1:]
            body = "\n".join(lines)
            if "START-INFO-DIR-ENTRY" in body or not body.strip():
                continue
            nodes.append(body.strip("\n"))
    return "\n\n".join(nodes) + "\n"


# ---------------------------------------------------------------- Coq

_COQ_LICENCE = re.compile(r"\A(?:\(\* *-\*-.*-\*- *\*\)\n)?\(\*{60,}\)\n(?:\(\*.*\n)*?\(\*{60,}\)\n\s*")


def without_coq_licence(text: str, path: str) -> str:
    """A Coq standard library file without the licence banner every file starts with."""
    stripped = _COQ_LICENCE.sub("", text, count=1)
    if "Coq Proof Assistant" in stripped[:2000]:
        raise ValueError(f"{path}: licence header not recognised")
    return stripped
