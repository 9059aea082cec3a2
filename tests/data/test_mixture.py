"""The mixture corpus: its tasks, its committed manifest, its packed token ids, the readers
that cut its texts out of Debian packages, and its disjointness from the evaluation samples.

The corpus itself is built on a machine (``scca-eval tasks build mixture``), not shipped.
What runs everywhere: the machinery on small inputs, and the disjointness check with the
real SmolLM2 tokenizer on a committed slice (the first 512 token ids of every document,
``tests/assets/mixture_slice.tokens.xz``) and on a copy of a training file with an
evaluation paragraph pasted in (which it must find). The check of the whole corpus is
``slow`` and runs where the corpus is built or imported (the tests use an empty cache
unless ``SCCA_EVAL_CACHE`` is set, so point it at the cache that holds the corpus):
``SCCA_EVAL_CACHE=~/.cache/scca-eval python -m pytest -q -m slow tests/data/test_mixture.py``.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from scca_eval.data import load_task, tokenize_task
from scca_eval.data.corpora import packed, packed_path, read_manifest, state, texts_dir
from scca_eval.data.corpora import build as builder
from scca_eval.data.corpora import mixture, readers
from scca_eval.data.overlap import RUN_LENGTH, documents_sharing_runs, hash_set
from scca_eval.data.sources import read_documents
from scca_eval.data.tasks import parse_task_file
from scca_eval.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tasks" / "data"
SLICE = REPO / "tests" / "assets" / "mixture_slice.tokens.xz"
EVAL_TASKS = ("pg19_sample", "proof_pile_sample")


# ---------------------------------------------------------------- the committed manifest

@pytest.fixture(scope="module")
def manifest():
    return read_manifest("mixture")


def test_manifest_sizes_domains_and_documents_agree(manifest):
    documents = manifest["documents"]
    for split in mixture.SPLITS:
        docs = [d for d in documents if d["split"] == split]
        totals = manifest["splits"][split]
        assert totals["documents"] == len(docs)
        assert totals["tokens"] == sum(d["tokens"] for d in docs)
        assert sum(d["tokens"] for d in manifest["domains"][split].values()) == totals["tokens"]
        for domain in mixture.DOMAINS:  # every domain in both splits
            assert manifest["domains"][split][domain]["tokens"] == sum(d["tokens"] for d in docs if d["domain"] == domain) > 0
    assert manifest["splits"]["train"]["tokens"] >= 30_000_000
    assert manifest["splits"]["validation"]["tokens"] >= 1_000_000
    assert min(d["tokens"] for d in documents) >= 16_384
    assert len({(d["split"], d["id"]) for d in documents}) == len(documents)
    # listed (and packed) in the order a task reads the files: by path
    for split in mixture.SPLITS:
        ids = [d["id"] for d in documents if d["split"] == split]
        assert ids == sorted(ids)


def test_sources_table_names_every_package_with_its_version_and_a_licence(manifest):
    table = (DATA / "MIXTURE_SOURCES.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (train|validation) \| ([\w.+-]+) \| ([^|]+) \| `([^`]+)` \| (\d+) \| ([\d,]+) \| ([^|]+) \|$",
                      table, flags=re.M)
    assert {package for _, package, *_ in rows} == set(mixture.PACKAGES)
    for _, package, version, _, files, _, licence in rows:
        assert version.strip() == mixture.PACKAGES[package].version
        assert int(files) > 0 and licence.strip()
    assert {split for split, *_ in rows} == {"train", "validation"}


def test_task_files_read_the_built_corpus():
    for split in mixture.SPLITS:
        task = load_task(f"mixture_{split}")
        assert (task.source.type, task.source.corpus, task.source.split) == ("built", "mixture", split)
        assert task.use == ("training" if split == "train" else "validation")


# ---------------------------------------------------------------- tasks that are not built

def test_a_corpus_not_built_says_how_to_build_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path))  # an empty cache: neither built nor imported
    assert state("mixture") == "not built"
    with pytest.raises(UserError, match=r"mixture_train is not built on this machine: run 'scca-eval tasks "
                                        r"build mixture'.*'scca-eval tasks unpack FILE'"):
        read_documents(load_task("mixture_train"))
    for command in (["ppl", "--task", "mixture_validation"], ["finetune", "--task", "mixture_train", "--ctx", "256",
                                                               "--out", str(tmp_path / "out")]):
        # refused before the model is loaded (it does not exist)
        status, _, err = run_cli([*command, "--model", "/no/such/model"], capsys)
        assert status == 2 and err.count("\n") == 1 and "is not built on this machine" in err


def test_tasks_lists_every_task_with_use_size_and_state(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path))
    status, out, _ = run_cli(["tasks"], capsys)
    assert status in (0, None)
    flat = " ".join(out.split())
    for name, use in (("pg19", "evaluation"), ("pg19_sample", "evaluation"), ("pg19_train", "training"),
                      ("mixture_train", "training"), ("mixture_validation", "validation"),
                      ("proof_pile", "evaluation"), ("proof_pile_train", "training")):
        assert re.search(rf"\b{name}\b[│| ]+{use}\b", flat), name
    manifest = read_manifest("mixture")
    assert f"{manifest['splits']['train']['tokens']:,}" in out
    assert f"{manifest['splits']['validation']['tokens']:,}" in out
    assert "704,516" in out  # pg19_sample's tokens: from its task file
    assert "not built" in out


@pytest.mark.parametrize("field, value, message", [
    ("corpus", "nope", "unknown corpus 'nope'"),
    ("split", "test", "unknown split 'test'"),
])
def test_a_bad_built_source_is_a_user_error(tmp_path, field, value, message):
    source = {"type": "built", "corpus": "mixture", "split": "train", field: value}
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps({"name": "t", "source": source}), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        parse_task_file(path)


@pytest.mark.parametrize("extra, message", [({"use": "testing"}, "unknown use 'testing'"),
                                            ({"tokens": -3}, "tokens: must be a whole number")])
def test_bad_use_or_tokens_is_a_user_error(tmp_path, extra, message):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps({"name": "t", "source": {"type": "text", "path": str(tmp_path)}, **extra}))
    with pytest.raises(UserError, match=message):
        parse_task_file(path)


def test_evaluating_a_training_task_warns_once():
    from scca_eval.validation import warn_if_not_evaluation

    said = []
    specs = [load_task("pg19_train"), load_task("pg19_sample"), load_task("mixture_validation")]
    warn_if_not_evaluation(specs, said.append)
    warn_if_not_evaluation(specs, said.append)  # ppl evaluates once per pattern: still one line each
    assert len(said) == 2
    assert said[0].startswith("warning: pg19_train is a training task")
    assert said[1].startswith("warning: mixture_validation is a validation task")


# ---------------------------------------------------------------- packed token ids

def _fake_corpus(texts: dict[str, dict[str, str]]):
    """Texts written where the built mixture lives (the test cache), as the build writes them."""
    for split, docs in texts.items():
        for doc_id, text in docs.items():
            path = texts_dir("mixture", split) / doc_id
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def _pack_from_texts(tokenizer, path: Path) -> None:
    from scca_eval.data.sources import Document
    from scca_eval.data.tokens import _document_digest, tokenizer_fingerprint

    splits = {}
    for split in mixture.SPLITS:
        docs = read_documents(load_task(f"mixture_{split}"))
        splits[split] = [packed.PackedDocument(
            d.id, np.asarray(tokenizer(d.text, add_special_tokens=False)["input_ids"], dtype=np.uint16),
            len(d.text.encode()), len(re.split(r"\s+", d.text)), _document_digest(Document(d.id, d.text)).hex())
            for d in docs]
    packed.write(path, "mixture", tokenizer_fingerprint(tokenizer), splits)


@pytest.fixture
def fake_mixture(tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alice = (DATA / "pg19_sample" / "carroll_alice.txt").read_text(encoding="utf-8")
    _fake_corpus({"train": {"books/a.txt": alice[:3000], "code/b.txt": alice[3000:5000]},
                             "validation": {"books/c.txt": alice[5000:7000]}})
    return tokenizer


def test_packed_ids_give_the_same_task_as_the_texts(fake_mixture, tmp_path):
    tokenizer = fake_mixture
    from_texts = {split: tokenize_task(load_task(f"mixture_{split}"), tokenizer) for split in mixture.SPLITS}
    _pack_from_texts(tokenizer, packed_path("mixture"))
    shutil.rmtree(texts_dir("mixture"))
    assert state("mixture") == "imported"
    for split in mixture.SPLITS:
        from_pack = tokenize_task(load_task(f"mixture_{split}"), tokenizer)
        texts = from_texts[split]
        assert [d.id for d in from_pack.docs] == [d.id for d in texts.docs]
        assert [d.ids.tolist() for d in from_pack.docs] == [d.ids.tolist() for d in texts.docs]
        assert [(d.bytes, d.words) for d in from_pack.docs] == [(d.bytes, d.words) for d in texts.docs]
        assert from_pack.data_fingerprint == texts.data_fingerprint
        assert from_pack.tokenizer_fingerprint == texts.tokenizer_fingerprint
    with_bos = tokenize_task(load_task("mixture_train"), tokenizer, add_bos=True)
    assert with_bos.docs[0].ids[0] == tokenizer.bos_token_id
    with pytest.raises(UserError, match="this machine has its token ids, not its text"):
        read_documents(load_task("mixture_train"))


def test_finetune_trains_on_packed_ids_without_the_texts(fake_mixture, tiny_model_dir, tmp_path):
    from scca_eval import finetune

    def run(out):
        return finetune(str(tiny_model_dir), ctx=64, out=tmp_path / out, tasks=["mixture_train"], steps=1,
                        grad_accum=1, warmup_steps=1, notify=lambda message: None)

    with_texts = run("texts")
    _pack_from_texts(fake_mixture, packed_path("mixture"))
    shutil.rmtree(texts_dir("mixture"))
    with_ids = run("ids")
    assert with_ids["data"] == with_texts["data"]  # fingerprint, tokens, windows, document ids
    assert with_ids["data"]["tasks"][0]["documents"] == ["books/a.txt", "code/b.txt"]


def test_packed_ids_refuse_another_tokenizer_and_damage(fake_mixture, tmp_path):
    from scca_eval.data.corpora.packed import read

    _pack_from_texts(fake_mixture, tmp_path / "p.tokens.xz")
    other = _tiny_tokenizer_of(["completely different text " * 50])
    shutil.copyfile(tmp_path / "p.tokens.xz", packed_path("mixture"))
    shutil.rmtree(texts_dir("mixture"))
    with pytest.raises(UserError, match="made with another tokenizer"):
        tokenize_task(load_task("mixture_train"), other)
    data = bytearray(__import__("lzma").decompress((tmp_path / "p.tokens.xz").read_bytes()))
    data[-1] ^= 1  # one token id changed
    (tmp_path / "bad.tokens.xz").write_bytes(__import__("lzma").compress(bytes(data)))
    with pytest.raises(UserError, match="do not match their checksum"):
        read(tmp_path / "bad.tokens.xz")
    (tmp_path / "junk.tokens.xz").write_bytes(b"not xz")
    with pytest.raises(UserError, match="not a readable packed token file"):
        read(tmp_path / "junk.tokens.xz")


def _tiny_tokenizer_of(texts):
    from conftest import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, vocab_size=300)


def test_unpack_refuses_a_file_that_is_not_the_recorded_corpus(fake_mixture, tmp_path, capsys):
    from scca_eval.data.tokens import tokenizer_fingerprint

    # A pack made with the manifest's tokenizer fingerprint must hold the manifest's ids.
    header_fp = read_manifest("mixture")["tokenizer"]["fingerprint"]
    docs = {split: [packed.PackedDocument("books/x.txt", np.arange(5, dtype=np.uint16), 1, 1, "00" * 32)]
            for split in mixture.SPLITS}
    packed.write(tmp_path / "wrong.tokens.xz", "mixture", header_fp, docs)
    status, _, err = run_cli(["tasks", "unpack", str(tmp_path / "wrong.tokens.xz")], capsys)
    assert status == 2 and "is not the mixture corpus this scca-eval records" in err
    # A pack of the tiny tokenizer is imported (only its own checksums apply).
    _pack_from_texts(fake_mixture, tmp_path / "ok.tokens.xz")
    assert tokenizer_fingerprint(fake_mixture) != header_fp
    status, out, _ = run_cli(["tasks", "unpack", str(tmp_path / "ok.tokens.xz")], capsys)
    assert status in (0, None) and "mixture_train: 2 documents" in out
    assert packed_path("mixture").read_bytes() == (tmp_path / "ok.tokens.xz").read_bytes()


def test_pack_copies_the_checked_ids_or_says_how_to_build(fake_mixture, tmp_path, capsys):
    status, _, err = run_cli(["tasks", "pack", "mixture", "--out", str(tmp_path / "m.tokens.xz")], capsys)
    assert status == 2 and "is missing (its texts are built): run 'scca-eval tasks build mixture' again" in err
    assert err.count("\n") == 1
    _pack_from_texts(fake_mixture, packed_path("mixture"))
    status, out, _ = run_cli(["tasks", "pack", "mixture", "--out", str(tmp_path / "m.tokens.xz")], capsys)
    assert status in (0, None) and "scca-eval tasks unpack m.tokens.xz" in out
    assert (tmp_path / "m.tokens.xz").read_bytes() == packed_path("mixture").read_bytes()


# ---------------------------------------------------------------- cutting texts out of packages

def test_a_deb_is_read_without_dpkg(tmp_path):
    import io
    import lzma
    import tarfile

    from scca_eval.data.corpora.debian import read_files

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        for name, content in (("./usr/share/doc/x/b.txt", b"second"), ("./usr/share/doc/x/a.txt", b"first"),
                              ("./usr/bin/tool", b"\x7fELF")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [(b"debian-binary", b"2.0\n"), (b"control.tar.xz", lzma.compress(b"")),
               (b"data.tar.xz", payload.getvalue())]
    deb = b"!<arch>\n"
    for name, content in members:
        deb += name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8) \
            + str(len(content)).encode().ljust(10) + b"`\n" + content + (b"\n" if len(content) % 2 else b"")
    (tmp_path / "x.deb").write_bytes(deb)
    found = read_files(tmp_path / "x.deb", lambda p: p.startswith("/usr/share/doc/"))
    assert found == {"/usr/share/doc/x/a.txt": b"first", "/usr/share/doc/x/b.txt": b"second"}
    (tmp_path / "y.deb").write_bytes(b"not a deb")
    with pytest.raises(UserError, match="not a Debian package"):
        read_files(tmp_path / "y.deb", lambda p: True)


def _sword_module(entries_by_testament, wide):
    """A zText/zCom module's files from entries (None: an empty verse slot), one block per testament."""
    files = {}
    prefix, verse_format = ("cz", "<III") if wide else ("bz", "<IIH")
    for testament, entries in entries_by_testament.items():
        plain = b"".join(e.encode() for e in entries if e is not None)
        block = zlib.compress(plain)
        files[f"m/{testament}.{prefix}s"] = struct.pack("<III", 0, len(block), len(plain))
        files[f"m/{testament}.{prefix}z"] = block
        verses, offset = b"", 0
        for entry in entries:
            size = 0 if entry is None else len(entry.encode())
            verses += struct.pack(verse_format, 0, offset if entry else 0, size)
            offset += size
        files[f"m/{testament}.{prefix}v"] = verses
    return files


@pytest.mark.parametrize("wide", [False, True])
def test_sword_entries_and_osis_text(wide):
    module = _sword_module({"ot": [None, '<title type="main">Genesis</title>', '<chapter n="1" sID="Gen.1"/>',
                                   'In the <w lemma="strong:H7225">beginning</w>.', None, "And &amp; so."],
                            "nt": ["<div sID=\"x\" type=\"x-p\"/>Amen.<note>a note</note>"]}, wide)
    entries = readers.sword_entries(module, "m", wide)
    assert len(entries) == 5
    assert readers.osis_to_text(entries) == "Genesis\n\nChapter 1\n\nIn the beginning. And & so.\n\nAmen.\n"


def test_dictd_info_and_coq_readers():
    data = "00-database-url\nhttp://x\nA, n. First.\nB, n. Second.\n"
    b64 = readers._B64

    def number(n):
        return b64[n // 64] + b64[n % 64] if n >= 64 else b64[n]

    index = "".join(f"{word}\t{number(data.index(start))}\t{number(length)}\n" for word, start, length in
                    (("00-database-url", "00-database-url", 25), ("A", "A, n.", 13), ("B", "B, n.", 14)))
    assert readers.dictd_text(gzip.compress(data.encode()), index.encode()) == "A, n. First.\n\nB, n. Second.\n"
    info = ("This is x.info.\n\x1f\nFile: x.info,  Node: Top,  Next: A\n\nTop text.\n\x1f\n"
            "File: x.info,  Node: A\n\nA text.\n\x1f\nTag Table:\nNode: Top\x7f1\n\x1f\nEnd Tag Table\n")
    assert readers.info_text([info]) == "This is x.info.\n\nTop text.\n\nA text.\n"
    banner = "(" + "*" * 72 + ")\n(*   The Coq Proof Assistant   *)\n(" + "*" * 72 + ")\n\nLemma a : True.\n"
    assert readers.without_coq_licence(banner, "a.v") == "Lemma a : True.\n"


def test_set_mm_is_cut_at_its_part_banners():
    bar = "#" * 79
    text = f"$( header $)\n$(\n{bar}\n   PART ONE\n{bar}\n$)\nax1 $a x $.\n$(\n{bar}\n   PART TWO\n{bar}\n$)\n"
    parts = mixture.set_mm_parts(text)
    assert [title for title, _ in parts] == ["(start)", "PART ONE", "PART TWO"]
    assert "".join(part for _, part in parts) == text


def _part(split, group, text):
    return mixture.Part(split, "code", group, "p", "/x", "/x", "MIT", text)


def test_documents_join_parts_to_the_minimum_length(monkeypatch):
    monkeypatch.setattr(builder, "MIN_DOCUMENT_CHARS", 10)
    parts = [_part("train", "g", "a" * 6), _part("train", "g", "b" * 6), _part("train", "g", "c" * 3),
             _part("validation", "g", "d" * 4), _part("train", "h", "e" * 30)]
    docs = builder.assemble(parts)
    assert [(d.split, d.id, d.text) for d in docs] == [
        ("train", "code/g.txt", "a" * 6 + "\n\n" + "b" * 6 + "\n\n" + "c" * 3 + "\n"),
        ("validation", "code/g.txt", "d" * 4 + "\n"),
        ("train", "code/h.txt", "e" * 30 + "\n"),
    ]
    assert builder.without_repeats([_part("train", "g", "x"), _part("train", "h", "x")]) == [_part("train", "g", "x")]


def test_a_document_left_short_joins_its_neighbour(monkeypatch, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(builder, "MIN_DOCUMENT_CHARS", 1)
    monkeypatch.setattr(builder, "MIN_DOCUMENT_TOKENS", 200)
    alice = (DATA / "pg19_sample" / "carroll_alice.txt").read_text(encoding="utf-8")
    docs = builder.assemble([_part("train", "g", alice[:3000]), _part("train", "g", alice[3000:3100]),
                             _part("train", "g", alice[4000:7000]), _part("train", "h", alice[8000:8100])])
    for doc in docs:
        doc.ids = np.asarray(tokenizer(doc.text)["input_ids"])
    assert [len(d.ids) >= 200 for d in docs] == [True, False, True, False]
    joined = builder._named(builder._join_short(docs, tokenizer, np.zeros(0, dtype=np.uint64)))
    assert [d.id for d in joined] == ["code/g_001.txt", "code/g_002.txt", "code/h.txt"]
    assert joined[0].text == docs[0].text + "\n" + docs[1].text  # the short one joined the one before it
    assert joined[0].ids.tolist() == tokenizer(joined[0].text)["input_ids"]
    assert joined[1].text == docs[2].text and joined[2].text == docs[3].text  # alone in its group: kept


def test_shared_paragraphs_are_removed(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    alice = (DATA / "pg19_sample" / "carroll_alice.txt").read_text(encoding="utf-8")
    evaluation_paragraph = alice[20000:22000].split("\n\n")[1]
    assert len(tokenizer(evaluation_paragraph)["input_ids"]) > 2 * RUN_LENGTH
    own = [alice[40000 + 900 * i: 40000 + 900 * i + 800].replace("\n\n", "\n") for i in range(3)]
    text = "\n\n".join([own[0], own[1], evaluation_paragraph, own[2]]) + "\n"
    reference = hash_set([tokenizer(alice[:30000])["input_ids"]])
    cleaned, ids, removed = builder.remove_shared_runs(text, tokenizer, reference)
    assert removed == ["\n" + evaluation_paragraph + "\n"]
    assert cleaned == "\n\n".join([own[0], own[1], own[2]]) + "\n"
    assert ids.tolist() == tokenizer(cleaned, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- disjointness, real tokenizer

@pytest.fixture(scope="module")
def evaluation_runs(smollm2_tokenizer):
    ids = [tokenizer_ids for task in EVAL_TASKS
           for tokenizer_ids in smollm2_tokenizer([d.text for d in read_documents(load_task(task))],
                                                  add_special_tokens=False)["input_ids"]]
    return hash_set(ids)


def check_disjoint(train: dict, validation: dict, evaluation_runs) -> list[str]:
    """Every pair of the three sets that shares a run of RUN_LENGTH tokens, as readable lines."""
    problems = []
    for name, scanned, reference in (("training", train, evaluation_runs),
                                     ("validation", validation, evaluation_runs),
                                     ("training", train, hash_set(validation.values()))):
        against = "validation" if reference is not evaluation_runs else "the evaluation samples"
        for doc_id, count in documents_sharing_runs(scanned, reference).items():
            problems.append(f"{name} document {doc_id} shares {count} runs of {RUN_LENGTH} tokens with {against}")
    return problems


def test_the_committed_slice_shares_no_run_with_the_evaluation_samples(evaluation_runs, manifest):
    header, splits = packed.read(SLICE)
    assert header["tokenizer_fingerprint"] == manifest["tokenizer"]["fingerprint"]
    assert [d.id for d in splits["train"]] == [d["id"] for d in manifest["documents"] if d["split"] == "train"]
    train = {d.id: d.ids for d in splits["train"]}
    validation = {d.id: d.ids for d in splits["validation"]}
    assert min(len(ids) for ids in train.values()) == 512
    assert check_disjoint(train, validation, evaluation_runs) == []


def _a_training_text() -> tuple[str, str]:
    """A real training file: a document of the built mixture where there is one, else a
    bundled training text."""
    if texts_dir("mixture", "train").is_dir():
        path = sorted(texts_dir("mixture", "train").rglob("*.txt"))[0]
        return path.name, path.read_text(encoding="utf-8")
    path = DATA / "pg19_train" / "austen_emma.txt.gz"
    return path.name, gzip.decompress(path.read_bytes()).decode("utf-8")


def test_the_check_finds_an_evaluation_paragraph_pasted_into_a_training_file(tmp_path, smollm2_tokenizer,
                                                                             evaluation_runs):
    name, text = _a_training_text()
    text = text[:40000]
    persuasion = (DATA / "pg19_sample" / "austen_persuasion.txt").read_text(encoding="utf-8")
    pasted = max(persuasion[100000:110000].split("\n\n"), key=len)  # a long paragraph of the evaluation sample
    middle = text.index("\n\n", len(text) // 2)
    (tmp_path / "copy.txt").write_text(text[:middle] + "\n\n" + pasted + text[middle:], encoding="utf-8")
    (tmp_path / "clean.txt").write_text(text, encoding="utf-8")

    def ids(file):
        return smollm2_tokenizer((tmp_path / file).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]

    validation = {"v": np.arange(100)}
    assert check_disjoint({"clean.txt": ids("clean.txt")}, validation, evaluation_runs) == []
    problems = check_disjoint({"copy.txt": ids("copy.txt")}, validation, evaluation_runs)
    assert len(problems) == 1 and problems[0].startswith("training document copy.txt shares")
    # and a validation text pasted into training is found as well
    validation = {"v": ids("clean.txt")[1000:3000]}
    assert check_disjoint({"copy.txt": ids("clean.txt")}, validation, evaluation_runs) == [
        f"training document copy.txt shares {2000 - RUN_LENGTH + 1} runs of {RUN_LENGTH} tokens with validation"]


@pytest.mark.slow
def test_the_whole_mixture_is_disjoint_and_as_recorded(smollm2_tokenizer, evaluation_runs, manifest):
    """Every training and validation document, tokenized again from the texts where they are
    built (else the imported ids), against the evaluation samples and each other; and the
    recorded checksums, token counts and slice."""
    if state("mixture") == "not built":
        pytest.skip("the mixture is not built here: scca-eval tasks build mixture")
    tokenized = {split: tokenize_task(load_task(f"mixture_{split}"), smollm2_tokenizer) for split in mixture.SPLITS}
    sets = {split: {d.id: d.ids for d in tokenized[split].docs} for split in mixture.SPLITS}
    assert check_disjoint(sets["train"], sets["validation"], evaluation_runs) == []
    if state("mixture") == "built":
        assert builder.verify("mixture") == []
    recorded = {(d["split"], d["id"]): d["tokens"] for d in manifest["documents"]}
    assert {(split, i): len(ids) for split in sets for i, ids in sets[split].items()} == recorded
    for split in mixture.SPLITS:
        docs = [packed.PackedDocument(d.id, d.ids, 0, 0, "") for d in tokenized[split].docs]
        assert packed.split_sha256(docs) == manifest["splits"][split]["ids_sha256"]
    _, slices = packed.read(SLICE)
    for split in mixture.SPLITS:
        for piece in slices[split]:
            assert piece.ids.tolist() == sets[split][piece.id][:512].tolist()


@pytest.mark.slow
def test_bundled_task_files_state_their_token_counts(smollm2_tokenizer, tmp_path):
    """The `tokens:` of each bundled task file (what `scca-eval tasks` lists) is its size."""
    for name in ("pg19_sample", "proof_pile_sample", "pg19_train", "proof_pile_train"):
        task = load_task(name)
        assert task.tokens == tokenize_task(task, smollm2_tokenizer, cache_dir=tmp_path).tokens, name
