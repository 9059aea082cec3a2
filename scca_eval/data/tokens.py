"""Tokenizing a task once per tokenizer, with an on-disk cache.

The cache key is (tokenizer fingerprint, data fingerprint): the tokenizer's serialized
form plus whether a BOS token is prepended, and a hash over the documents' ids and texts.
Every ctx of a run, and every later run with the same tokenizer and data, reuses the ids.

Besides the ids, each document keeps what bits per byte and word perplexity need for any
prefix of it (``--max-tokens`` evaluates prefixes): for every token, the UTF-8 bytes of
text it adds and the whitespace runs that start in that text (two small integers), so
the bytes and words of any prefix are sums over its tokens. Words are counted as
lm-evaluation-harness counts them, ``len(re.split(r"\\s+", text))``; bytes are
``len(text.encode("utf-8"))``. A prefix that ends inside a character (a byte-level token
boundary) counts that whole character.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..files import atomic_write, cache_root
from .sources import Document, iter_file_chunks, read_documents, read_token_stream
from .tasks import TaskSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
_WHITESPACE_RUN = re.compile(r"\s+")
# Tokenize in batches of about this many characters: the tokenizer works on a batch in
# parallel, and memory stays bounded on large datasets.
_BATCH_CHARS = 8_000_000


def default_cache_dir() -> Path:
    """``tokens/`` in the cache root (``$SCCA_EVAL_CACHE``, default ``~/.cache/scca-eval``)."""
    return cache_root() / "tokens"


# ---------------------------------------------------------------- counting words and bytes

def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(_WHITESPACE_RUN.split(text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def prefix_counts(text: str, char_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes and words of ``text[:e]`` for every ``e`` in ``char_ends``.

    ``re.split(r"\\s+", s)`` has one more piece than ``s`` has whitespace runs, and a
    prefix ``text[:e]`` holds exactly the runs of ``text`` that start before ``e`` (a run
    cut by the end is still one run), so words(e) = 1 + runs starting before e.
    """
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    char_bytes = 1 + (code_points >= 0x80).astype(np.int64) + (code_points >= 0x800) + (code_points >= 0x10000)
    bytes_before = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(char_bytes, out=bytes_before[1:])
    run_starts = np.fromiter((m.start() for m in _WHITESPACE_RUN.finditer(text)), dtype=np.int64)
    words = 1 + np.searchsorted(run_starts, char_ends, side="left")
    return bytes_before[char_ends], words.astype(np.int64)


# ---------------------------------------------------------------- fingerprints

# Text whose ids show how a tokenizer splits prose, digits, code, whitespace and scripts.
_PROBE_TEXT = (
    "The quick brown fox, aged 42, jumped over 3.14159 lazy dogs!\n\n"
    "def f(x):\n    return x ** 2  # squared\t\ttabs\n"
    "\\begin{theorem} $\\forall \\epsilon > 0$ \\end{theorem}\r\n"
    "Ünïcödé — “quotes” … 日本語のテキスト 中文 Русский текст 🙂🚀  trailing   spaces "
)


def tokenizer_definition(tokenizer) -> str:
    """What decides a tokenizer's ids, in a form that does not depend on library versions.

    The serialized form (``backend_tokenizer.to_str()``) changes between ``tokenizers``
    releases for the same tokenizer, so it cannot name one across machines. This is the
    vocabulary, the merges (as "a b" strings), the added tokens, and the ids of a fixed
    probe text (which covers the normalizer and pre-tokenizer); and, where a tokenizer has
    them, its pieces' scores (Unigram) or its sentencepiece model file.
    """
    definition: dict = {"vocab": sorted(tokenizer.get_vocab().items()), "merges": []}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model") or {}
        definition["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        probe = backend.encode(_PROBE_TEXT, add_special_tokens=False).ids
    else:
        probe = tokenizer.encode(_PROBE_TEXT, add_special_tokens=False)
    definition["added"] = sorted((token.content if hasattr(token, "content") else str(token), int(index))
                                 for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items())
    definition["probe"] = list(probe)
    if backend is not None and isinstance(model.get("vocab"), list):  # Unigram: [piece, score] pairs
        definition["scores"] = model["vocab"]
    sp_model = getattr(tokenizer, "sp_model", None)
    if backend is None and sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        definition["sentencepiece"] = hashlib.sha256(sp_model.serialized_model_proto()).hexdigest()
    return json.dumps(definition, ensure_ascii=False)


def tokenizer_fingerprint(tokenizer, add_bos: bool = False) -> str:
    """sha256 of the tokenizer's definition (:func:`tokenizer_definition`) and of whether a BOS
    token starts the ids.

    The one tokenizer fingerprint: the token cache's key, the built corpora's manifest, and
    ``config.tokenizer_fingerprint`` of every record (perplexity and passkey) and the tokenizer
    summary in ``config.model.tokenizer``."""
    digest = hashlib.sha256(tokenizer_definition(tokenizer).encode("utf-8"))
    bos = tokenizer.bos_token_id if add_bos else None
    digest.update(f"|add_bos={bool(add_bos)}|bos={bos}".encode())
    return digest.hexdigest()


def _document_digest(doc: Document) -> bytes:
    digest = hashlib.sha256()
    ident = doc.id.encode("utf-8")
    text = doc.text.encode("utf-8")
    digest.update(len(ident).to_bytes(8, "little") + ident + len(text).to_bytes(8, "little") + text)
    return digest.digest()


def _combine(digests: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for item in digests:
        digest.update(item)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in iter_file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- results

@dataclass(frozen=True, eq=False)
class TokenizedDoc:
    """A document's token ids and its size in bytes and words (None when unknown)."""

    id: str
    ids: np.ndarray  # int32
    bytes: int | None
    words: int | None
    # Per token: UTF-8 bytes of the text the token adds, and whitespace runs starting in
    # it (None when the tokenizer gives no character offsets).
    token_bytes: np.ndarray | None = field(default=None, repr=False)
    token_runs: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def prefix_stats(self, length: int) -> tuple[int | None, int | None]:
        """(bytes, words) of the text covered by the first ``length`` tokens.

        For the whole document these are exactly lm-evaluation-harness's counts of its
        text; a prefix counts the text up to the end of its last token.
        """
        if not 1 <= length <= len(self.ids):
            raise ValueError(f"prefix length {length} outside 1..{len(self.ids)}")
        if length == len(self.ids):
            return self.bytes, self.words
        if self.token_bytes is None or self.token_runs is None:
            return None, None
        runs = int(self.token_runs[:length].sum(dtype=np.int64))
        return int(self.token_bytes[:length].sum(dtype=np.int64)), count_words("") + runs


@dataclass(frozen=True, eq=False)
class TokenizedTask:
    """A task's selected documents as token ids, with the fingerprints that identify them."""

    task: TaskSpec
    docs: list[TokenizedDoc]
    skipped: list[str]            # ids of selected documents with fewer than 2 tokens
    data_fingerprint: str         # sha256 over the selected documents (ids and texts), or the .bin bytes
    tokenizer_fingerprint: str
    flat: bool = False            # True for a LongLoRA token stream (one long "document")
    add_bos: bool = False
    documents_read: int = 0       # documents read from the source (before min_tokens / sample)
    below_min_tokens: int = 0     # of those, how many min_tokens left out

    @property
    def tokens(self) -> int:
        return int(sum(len(d.ids) for d in self.docs))

    def describe(self) -> dict:
        """The task as it was evaluated, for the result record."""
        return {
            **self.task.to_dict(),
            "flat_stream": self.flat,
            "add_bos": self.add_bos,
            "documents_read": self.documents_read,
            "below_min_tokens": self.below_min_tokens,
            "documents": len(self.docs),
            "skipped_documents": len(self.skipped),
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------- the cache file

def _cache_path(cache_dir: Path, tokenizer_fp: str, source_fp: str) -> Path:
    key = hashlib.sha256(f"{CACHE_FORMAT}|{tokenizer_fp}|{source_fp}".encode()).hexdigest()[:40]
    return cache_dir / f"{key}.npz"


@dataclass
class _Tokenized:
    """Every document of the source, tokenized (what the cache file holds)."""

    ids: list[np.ndarray]
    token_bytes: list[np.ndarray] | None
    token_runs: list[np.ndarray] | None
    bytes: list[int]
    words: list[int]


def _small_ints(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-token counts as uint16 (a token adds a few bytes), wider only if needed."""
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return joined.astype(np.uint16 if joined.size == 0 or joined.max() < 1 << 16 else np.int64)


def _write_cache(path: Path, meta: dict, tokenized: _Tokenized) -> None:
    bounds = np.zeros(len(tokenized.ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in tokenized.ids], out=bounds[1:])
    ids = np.concatenate(tokenized.ids) if tokenized.ids else np.zeros(0, np.int32)
    arrays = {"ids": ids.astype(np.int32, copy=False), "bounds": bounds}
    if tokenized.token_bytes is not None:
        arrays["token_bytes"] = _small_ints(tokenized.token_bytes)
        arrays["token_runs"] = _small_ints(tokenized.token_runs)
    meta = {**meta, "bytes": tokenized.bytes, "words": tokenized.words,
            "ids_sha256": hashlib.sha256(arrays["ids"].tobytes()).hexdigest()}
    arrays["meta"] = np.array(json.dumps(meta))
    # Atomic: a reader never sees a half-written cache file, even if this process is killed.
    atomic_write(path, lambda handle: np.savez(handle, **arrays), os_errors=True)


def _read_cache(path: Path, expected: dict) -> _Tokenized | None:
    """The cached tokens, or None when the file is missing, foreign or damaged."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            ids = data["ids"]
            bounds = data["bounds"]
            has_sizes = "token_bytes" in data.files
            token_bytes = data["token_bytes"] if has_sizes else None
            token_runs = data["token_runs"] if has_sizes else None
        n_docs = len(expected["doc_ids"])
        problems = [
            any(meta.get(k) != v for k, v in expected.items()),
            ids.dtype != np.int32 or bounds.shape != (n_docs + 1,),
            bounds[0] != 0 or bounds[-1] != len(ids) or bool(np.any(np.diff(bounds) < 0)),
            len(meta["bytes"]) != n_docs or len(meta["words"]) != n_docs,
            has_sizes and (len(token_bytes) != len(ids) or len(token_runs) != len(ids)),
            hashlib.sha256(ids.tobytes()).hexdigest() != meta["ids_sha256"],
        ]
        if any(problems):
            raise ValueError("contents do not match their description")
    except Exception as error:  # a damaged zip, bad JSON, missing arrays, wrong shapes ...
        log.warning("token cache %s is damaged (%s); tokenizing again", path, str(error).splitlines()[0][:120])
        return None
    cuts = bounds[1:-1]
    return _Tokenized(
        ids=np.split(ids, cuts),
        token_bytes=np.split(token_bytes, cuts) if has_sizes else None,
        token_runs=np.split(token_runs, cuts) if has_sizes else None,
        bytes=list(meta["bytes"]),
        words=list(meta["words"]),
    )


# ---------------------------------------------------------------- tokenizing

def _batches(documents: Sequence[Document]) -> list[list[int]]:
    batches, current, chars = [], [], 0
    for index, doc in enumerate(documents):
        current.append(index)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS:
            batches.append(current)
            current, chars = [], 0
    if current:
        batches.append(current)
    return batches


def _tokenize(documents: Sequence[Document], tokenizer, add_bos: bool,
              progress: Callable[[int, int], None] | None) -> _Tokenized:
    with_offsets = bool(getattr(tokenizer, "is_fast", False))
    bos = tokenizer.bos_token_id if add_bos else None
    out = _Tokenized(ids=[], token_bytes=[] if with_offsets else None,
                     token_runs=[] if with_offsets else None, bytes=[], words=[])
    done = 0
    for batch in _batches(documents):
        texts = [documents[i].text for i in batch]
        kwargs = {"add_special_tokens": False, "return_attention_mask": False, "verbose": False}
        encoded = tokenizer(texts, return_offsets_mapping=with_offsets, **kwargs)
        for position, text in enumerate(texts):
            ids = np.asarray(encoded["input_ids"][position], dtype=np.int32)
            if with_offsets:
                offsets = np.asarray(encoded["offset_mapping"][position], dtype=np.int64).reshape(-1, 2)
                # A token's text ends at the furthest offset so far: byte-level tokens inside
                # one character repeat that character's span, and some tokenizers report
                # (0, 0) for tokens without text.
                char_ends = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else offsets[:, 1]
                prefix_bytes, prefix_words = prefix_counts(text, np.minimum(char_ends, len(text)))
                # What each token adds (the empty text has 0 bytes and count_words("") words).
                token_bytes = np.diff(prefix_bytes, prepend=0)
                token_runs = np.diff(prefix_words, prepend=count_words(""))
            if bos is not None:
                ids = np.concatenate([np.array([bos], dtype=np.int32), ids])
                if with_offsets:  # the BOS token covers no text
                    token_bytes = np.concatenate([[0], token_bytes])
                    token_runs = np.concatenate([[0], token_runs])
            out.ids.append(ids)
            if with_offsets:
                out.token_bytes.append(_small_ints([token_bytes]))
                out.token_runs.append(_small_ints([token_runs]))
            out.bytes.append(count_bytes(text))
            out.words.append(count_words(text))
        done += len(batch)
        if progress is not None:
            progress(done, len(documents))
    return out


def _select(task: TaskSpec, lengths: Sequence[int], add_bos: bool) -> tuple[list[int], int]:
    """Indices of the documents the task's selection keeps, and how many min_tokens dropped."""
    selection = task.selection
    chosen = list(range(len(lengths)))
    below = 0
    if selection.min_tokens is not None:
        own = [n - (1 if add_bos else 0) for n in lengths]  # BOS does not count
        chosen = [i for i in chosen if own[i] >= selection.min_tokens]
        below = len(lengths) - len(chosen)
        if not chosen:
            raise UserError(f"{task.label}: no document has at least {selection.min_tokens} tokens "
                            f"(of {len(lengths)} read); lower selection.min_tokens")
    if selection.sample is not None:
        if selection.sample > len(chosen):
            raise UserError(f"{task.label}: selection.sample is {selection.sample} but only {len(chosen)} "
                            "documents are eligible; lower sample (or min_tokens)")
        if selection.sample_method == "first":
            chosen = chosen[: selection.sample]
        else:
            rng = np.random.default_rng(selection.seed)
            picks = rng.choice(len(chosen), size=selection.sample, replace=False)
            chosen = [chosen[i] for i in sorted(int(p) for p in picks)]
    return chosen, below


def tokenize_task(task: TaskSpec, tokenizer, *, add_bos: bool = False, cache_dir: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> TokenizedTask:
    """The task's selected documents as token ids, from the cache when it has them.

    Documents are tokenized without special tokens; with ``add_bos`` the tokenizer's BOS
    id is put in front of each (the BOS is never a scored target: the engine never scores
    a document's first token). Documents with fewer than two tokens cannot be scored:
    they are listed in ``skipped``. A LongLoRA ``.bin`` stream is returned as one flat
    document (``flat=True``) without byte or word counts; ``add_bos`` does not apply to it.
    ``progress(done, total)`` is called after each batch of documents is tokenized.
    """
    if task.source.type == "longlora_bin":
        return _token_stream_task(task, tokenizer)
    if add_bos and tokenizer.bos_token_id is None:
        raise UserError("the tokenizer has no BOS token; evaluate without --bos")
    if task.source.type == "built":
        from .corpora import packed_path, texts_dir

        if not texts_dir(task.source.corpus, task.source.split).is_dir() and packed_path(task.source.corpus).is_file():
            return _packed_task(task, tokenizer, add_bos)
    documents = read_documents(task)
    tokenizer_fp = tokenizer_fingerprint(tokenizer, add_bos)
    digests = [_document_digest(doc) for doc in documents]
    source_fp = _combine(digests)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _cache_path(cache_dir, tokenizer_fp, source_fp)
    expected = {"format": CACHE_FORMAT, "tokenizer_fingerprint": tokenizer_fp,
                "source_fingerprint": source_fp, "doc_ids": [d.id for d in documents]}

    tokenized = _read_cache(path, expected)
    if tokenized is None:
        tokenized = _tokenize(documents, tokenizer, add_bos, progress)
        try:
            _write_cache(path, expected, tokenized)
        except OSError as error:  # a read-only or full disk costs speed, not the run
            log.warning("could not write the token cache %s (%s); continuing without it", path, error)

    chosen, below = _select(task, [len(a) for a in tokenized.ids], add_bos)
    docs, skipped = [], []
    for i in chosen:
        if len(tokenized.ids[i]) < 2:
            skipped.append(documents[i].id)
            continue
        docs.append(TokenizedDoc(
            id=documents[i].id, ids=tokenized.ids[i], bytes=tokenized.bytes[i], words=tokenized.words[i],
            token_bytes=tokenized.token_bytes[i] if tokenized.token_bytes is not None else None,
            token_runs=tokenized.token_runs[i] if tokenized.token_runs is not None else None,
        ))
    if not docs:
        raise UserError(f"{task.label}: no document has two or more tokens; the data holds (almost) no text")
    return TokenizedTask(
        task=task, docs=docs, skipped=skipped,
        data_fingerprint=_combine([digests[i] for i in chosen]),
        tokenizer_fingerprint=tokenizer_fp, flat=False, add_bos=add_bos,
        documents_read=len(documents), below_min_tokens=below,
    )


def _token_stream_task(task: TaskSpec, tokenizer) -> TokenizedTask:
    stream = read_token_stream(task)
    path = task.source.path
    vocab = len(tokenizer)
    largest = int(stream.max())
    if largest >= vocab:
        raise UserError(f"{path}: token id {largest} is beyond the tokenizer's {vocab} ids; the file was "
                        "made with another tokenizer: evaluate it with the model it was made for")
    if len(stream) < 2:
        raise UserError(f"{path}: the stream holds {len(stream)} token; at least two are needed")
    doc = TokenizedDoc(id=path.name, ids=np.asarray(stream, dtype=np.int32), bytes=None, words=None)
    return TokenizedTask(
        task=task, docs=[doc], skipped=[], data_fingerprint=file_fingerprint(path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer, False), flat=True, add_bos=False,
        documents_read=1,
    )


def _packed_task(task: TaskSpec, tokenizer, add_bos: bool) -> TokenizedTask:
    """A built corpus's split from its packed token ids (no texts on this machine): the same
    documents, ids and data fingerprint as from the texts, for the tokenizer they were made with."""
    from .corpora import packed, packed_path

    path = packed_path(task.source.corpus)
    header, splits = packed.read_cached(path)
    if header["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer, False):
        raise UserError(f"{task.name}: this machine has only its token ids ({path}), made with another tokenizer "
                        f"than this model's, or packed by an older scca-eval; pack them again with this version "
                        f"('scca-eval tasks pack {task.source.corpus}' where the texts are built), or build its "
                        f"texts here with 'scca-eval tasks build {task.source.corpus}' to use another model")
    packed_docs = splits[task.source.split]
    bos = [tokenizer.bos_token_id] if add_bos else []
    ids = [np.concatenate([np.array(bos, dtype=np.int32), doc.ids.astype(np.int32)]) for doc in packed_docs]
    chosen, below = _select(task, [len(a) for a in ids], add_bos)
    docs = [TokenizedDoc(id=packed_docs[i].id, ids=ids[i], bytes=packed_docs[i].bytes, words=packed_docs[i].words)
            for i in chosen if len(ids[i]) >= 2]
    return TokenizedTask(
        task=task, docs=docs, skipped=[packed_docs[i].id for i in chosen if len(ids[i]) < 2],
        data_fingerprint=_combine([bytes.fromhex(packed_docs[i].digest) for i in chosen]),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer, add_bos), flat=False, add_bos=add_bos,
        documents_read=len(packed_docs), below_min_tokens=below,
    )
