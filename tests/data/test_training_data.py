"""The bundled training sample (pg19_train, proof_pile_train): readable, shipped, documented,
and disjoint from the evaluation samples.

Disjoint means: no training document shares a run of 50 consecutive SmolLM2 tokens with
an evaluation document. That is checked with the real tokenizer (slow: it is read from
the GGUF file); the run finder itself is checked here against a brute-force search.
"""

from __future__ import annotations

import fnmatch
import gzip
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from scca_eval.data.overlap import RUN_LENGTH, hash_set, run_hashes, shared_run_starts
from scca_eval.data.sources import read_documents
from scca_eval.data.tasks import load_task, task_from_data_path
from scca_eval.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tasks" / "data"
TRAIN_TASKS = ("pg19_train", "proof_pile_train")
EVAL_TASKS = ("pg19_sample", "proof_pile_sample")


# ---------------------------------------------------------------- finding shared runs

def brute_force_starts(ids, others, n):
    runs = {tuple(doc[i:i + n]) for doc in others for i in range(len(doc) - n + 1)}
    return [i for i in range(len(ids) - n + 1) if tuple(ids[i:i + n]) in runs]


def test_shared_runs_match_a_brute_force_search():
    rng = np.random.default_rng(0)
    evaluation = [rng.integers(0, 50, 400), rng.integers(0, 50, 300)]
    training = rng.integers(0, 50, 500)
    training[100:100 + RUN_LENGTH] = evaluation[1][40:40 + RUN_LENGTH]          # a whole run: found
    training[300:300 + RUN_LENGTH - 1] = evaluation[0][10:10 + RUN_LENGTH - 1]  # one token short: not found
    starts = shared_run_starts(training, hash_set(evaluation))
    assert starts.tolist() == brute_force_starts(training.tolist(), [e.tolist() for e in evaluation], RUN_LENGTH)
    assert starts.tolist() == [100]


def test_run_hashes_of_short_and_small_runs():
    assert len(run_hashes([1, 2, 3], n=50)) == 0
    hashes = run_hashes([5, 6, 5, 6, 7], n=2)
    assert hashes[0] == hashes[2] and len(set(hashes.tolist())) == 3
    assert run_hashes([0, 1], n=2)[0] != run_hashes([1, 0], n=2)[0]


# ---------------------------------------------------------------- gzip-compressed text documents

def test_gzip_text_files_read_as_their_text(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("première ligne\n".encode()))
    (tmp_path / "b.v").write_text("Lemma b : True.\n", encoding="utf-8")
    docs = read_documents(task_from_data_path(tmp_path))
    assert [(d.id, d.text) for d in docs] == [("a.txt", "première ligne\n"), ("b.v", "Lemma b : True.\n")]
    single = task_from_data_path(tmp_path / "a.txt.gz")
    assert single.name == "a" and single.source.type == "text"
    assert [d.id for d in read_documents(single)] == ["a.txt"]


@pytest.mark.parametrize("content", [b"not gzip at all", gzip.compress(b"x" * 5000)[:20]])
def test_broken_gzip_text_is_a_user_error(tmp_path, content):
    (tmp_path / "d.txt.gz").write_bytes(content)
    with pytest.raises(UserError, match=r"d.txt.gz: cannot be decompressed .*gzip"):
        read_documents(task_from_data_path(tmp_path / "d.txt.gz"))


# ---------------------------------------------------------------- the bundled files

def bundled_files(task: str) -> list[Path]:
    return sorted((DATA / task).iterdir())


def test_training_tasks_read_every_bundled_file_compressed():
    for task in TRAIN_TASKS:
        files = bundled_files(task)
        docs = read_documents(load_task(task))
        assert [d.id for d in docs] == [f.name[: -len(".gz")] for f in files]
        assert all(f.name.endswith(".gz") for f in files)
        assert all(d.text == gzip.decompress(f.read_bytes()).decode() for d, f in zip(docs, files))


def test_every_training_file_has_its_source_recorded():
    sources = (DATA / "TRAINING_SOURCES.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| ([\w.]+\.gz) \|", sources, flags=re.M))
    assert rows == {f.name for task in TRAIN_TASKS for f in bundled_files(task)}


def test_package_data_ships_every_bundled_data_file():
    # A non-editable install copies only what package-data lists.
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["scca_eval.tasks"]
    tasks_dir = REPO / "tasks"
    for path in tasks_dir.rglob("*"):
        relative = path.relative_to(tasks_dir).as_posix()
        if not path.is_file() or "__pycache__" in relative or path.suffix == ".py":
            continue
        assert any(fnmatch.fnmatchcase(relative, p) and relative.count("/") == p.count("/")
                   for p in patterns), f"{relative} is not in package-data"


def test_no_training_document_repeats_an_evaluation_document():
    evaluation = {d.text for t in EVAL_TASKS for d in read_documents(load_task(t))}
    for task in TRAIN_TASKS:
        assert not {d.text for d in read_documents(load_task(task))} & evaluation


# ---------------------------------------------------------------- with the SmolLM2 tokenizer (slow)

def token_ids(task: str, tokenizer) -> dict[str, list[int]]:
    docs = read_documents(load_task(task))
    encoded = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return {d.id: ids for d, ids in zip(docs, encoded)}


@pytest.mark.slow
def test_no_training_document_shares_a_50_token_run_with_an_evaluation_document(smollm2_tokenizer):
    evaluation = [ids for task in EVAL_TASKS for ids in token_ids(task, smollm2_tokenizer).values()]
    reference = hash_set(evaluation)
    totals = {}
    for task in TRAIN_TASKS:
        documents = token_ids(task, smollm2_tokenizer)
        totals[task] = sum(len(ids) for ids in documents.values())
        for doc_id, ids in documents.items():
            shared = shared_run_starts(ids, reference)
            assert len(shared) == 0, (f"{task}/{doc_id} shares {len(shared)} runs of {RUN_LENGTH} tokens with "
                                      f"the evaluation samples, e.g. {smollm2_tokenizer.decode(ids[shared[0]:shared[0] + RUN_LENGTH])!r}")
            assert len(ids) >= 16384, f"{task}/{doc_id}: {len(ids)} tokens, less than one 16k window"
    # TRAINING_SOURCES.md: about 815k (books) and 617k (proofs) SmolLM2 tokens.
    assert 780_000 < totals["pg19_train"] < 850_000
    assert 590_000 < totals["proof_pile_train"] < 650_000
