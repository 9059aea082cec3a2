"""Bad input to every command: one line on stderr, exit status 2, no traceback, no file written.

Each case runs the CLI in-process (``scca_eval.cli.main``) and checks the same four things;
a few run as a subprocess, the way a user meets them. The expected fragment of the message
makes sure the line is about the right problem.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from scca_eval.cli import main

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Files:
    """The bad (and a few good) inputs, made once."""

    root: Path
    model: Path
    data: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _record(tmp: Path, name: str, ppl: float, pattern: str = "full", tokenizer: str = "tok-a") -> Path:
    docs = [{"id": f"d{i}", "nll_sum": float(np.log(ppl) * 100), "tokens": 100, "bytes": 400, "words": 80}
            for i in range(4)]
    record = {
        "model": "m", "task": "t", "pattern": pattern, "ctx": 64, "stride": 64,
        "metrics": {"perplexity": ppl, "nll_sum": float(np.log(ppl) * 400), "tokens": 400,
                    "bits_per_byte": 1.0, "word_perplexity": 2.0, "ci95": [ppl * 0.9, ppl * 1.1]},
        "documents": docs,
        "config": {"protocol": "stride", "last_window": "full", "tokenizer_fingerprint": tokenizer, "data_fingerprint": "data-a",
                   "max_tokens": None, "pattern": {"name": pattern}},
        "runtime": {"seconds": 1.0},
    }
    path = tmp / name
    path.write_text(json.dumps(record))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, sample_data_dir) -> Files:
    root = tmp_path_factory.mktemp("bad-input")
    f = Files(root, tiny_model_dir, sample_data_dir)
    # models
    (root / "not_a_model.txt").write_text("hello")
    (root / "no_config").mkdir()
    (root / "no_config" / "weights.bin").write_bytes(b"\0" * 8)
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{ this is not json")
    (root / "not_causal").mkdir()
    (root / "not_causal" / "config.json").write_text(json.dumps(
        {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 8, "vocab_size": 10}))
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (root / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(200))
    (root / "empty.gguf").write_bytes(b"")
    # data
    (root / "empty_dir").mkdir()
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e ".encode("latin-1") * 50)
    (root / "bad.jsonl").write_text('{"text": "a whole line"}\n{"text": "cut in the mid')
    (root / "no_text_field.jsonl").write_text('{"body": "no text field here"}\n')
    with gzip.open(root / "good.jsonl.gz", "wb") as handle:
        handle.write(b'{"text": "' + b"word " * 2000 + b'"}\n')
    (root / "truncated.jsonl.gz").write_bytes((root / "good.jsonl.gz").read_bytes()[:40])
    (root / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(64))
    (root / "texts").mkdir()
    (root / "texts" / "doc.txt").write_text("A few plain words of text. " * 100)
    (root / "other" / "texts").mkdir(parents=True)  # another folder of the same name
    (root / "other" / "texts" / "doc.txt").write_text("Other plain words of text. " * 100)
    np.array([1, 2, 3, 60000] * 600, dtype=np.uint16).tofile(root / "beyond_vocab.bin")
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    # tasks
    (root / "no_source.yaml").write_text("name: broken\ndescription: no source\n")
    (root / "bad_type.yaml").write_text("name: broken\nsource: {type: floppy, path: x}\n")
    (root / "syntax.yaml").write_text("name: [unclosed\n")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "missing_path.yaml").write_text("name: broken\nsource: {type: text, path: nowhere}\n")
    # records
    (root / "records").mkdir()
    _record(root / "records", "a.json", 10.0)
    (root / "records_b").mkdir()
    _record(root / "records_b", "a.json", 10.5, tokenizer="tok-b")
    (root / "truncated.json").write_text(json.dumps({"model": "m", "task": "t"})[:15])
    (root / "not_record.json").write_text(json.dumps({"hello": 1}))
    (root / "latin1.json").write_bytes('{"model": "caf\xe9"}'.encode("latin-1"))
    (root / "empty_records").mkdir()
    # sweep files
    (root / "sweep_syntax.yaml").write_text("models: [default\n")
    (root / "sweep_list.yaml").write_text("- a\n- b\n")
    (root / "sweep_unknown.yaml").write_text("modles: [default]\n")
    (root / "sweep_ctx.yaml").write_text("ctx: [1024, big]\n")
    (root / "a_file").write_text("I am a file, not a folder")
    return f


def ppl(f: Files, *extra, data=None, model=None) -> list[str]:
    return ["ppl", "--model", str(model or f.model), "--data", str(data or f.data), "--ctx", "64",
            "--max-tokens", "128", "--device", "cpu", "-q", "--out", str(f.root / "out"), *extra]


def finetune(f: Files, *extra) -> list[str]:
    data = [] if "--data" in extra else ["--data", str(f.data)]
    return ["finetune", "--model", str(f.model), *data, "--ctx", "64", "--steps", "1", "--device", "cpu", "-q",
            *extra]


# (id, argv(files), fragment expected in the message)
CASES = [
    # ---- ppl: options
    ("ctx-not-int", lambda f: ppl(f, "--ctx", "abc"), "whole numbers"),
    ("ctx-empty", lambda f: ppl(f, "--ctx", ""), "at least one number"),
    ("ctx-one", lambda f: ppl(f, "--ctx", "1"), "at least 2"),
    ("ctx-zero-in-list", lambda f: ppl(f, "--ctx", "64,0"), "at least 2"),
    ("ctx-negative", lambda f: ppl(f, "--ctx", "-64"), "at least 2"),
    ("ctx-beyond-trained", lambda f: ppl(f, "--ctx", "4096"), "--allow-long-context"),
    ("stride-zero", lambda f: ppl(f, "--stride", "0"), "--stride"),
    ("stride-above-ctx", lambda f: ppl(f, "--stride", "65"), "--stride"),
    ("stride-not-int", lambda f: ppl(f, "--stride", "half"), "--stride"),
    ("pattern-unknown", lambda f: ppl(f, "--pattern", "s3"), "unknown pattern"),
    ("pattern-empty", lambda f: ppl(f, "--pattern", ""), "empty pattern"),
    ("pattern-shares", lambda f: ppl(f, "--pattern", "1/2 local + 1/4 cross(1)"), "sum to"),
    ("pattern-rule", lambda f: ppl(f, "--pattern", "1/2 local + 1/2 sideways"), "unknown rule"),
    ("chunk-zero", lambda f: ppl(f, "--pattern", "s2", "--chunk-size", "0"), "--chunk-size"),
    ("chunk-above-ctx", lambda f: ppl(f, "--pattern", "s2", "--chunk-size", "65"), "--chunk-size"),
    ("dilation-zero", lambda f: ppl(f, "--pattern", "sda", "--dilation", "0"), "--dilation"),
    ("backend", lambda f: ppl(f, "--attention-backend", "warp"), "--attention-backend"),
    ("batch-zero", lambda f: ppl(f, "--batch-size", "0"), "--batch-size"),
    ("batch-not-int", lambda f: ppl(f, "--batch-size", "many"), "--batch-size"),
    ("max-tokens-zero", lambda f: ppl(f, "--max-tokens", "0"), "--max-tokens"),
    ("save-every-zero", lambda f: ppl(f, "--save-every", "0"), "--save-every"),
    ("dtype", lambda f: ppl(f, "--dtype", "int8"), "--dtype"),
    ("device-unknown", lambda f: ppl(f, "--device", "tpu"), "device"),
    ("device-cuda-absent", lambda f: ppl(f, "--device", "cuda:7"), "cuda"),
    ("device-map-choice", lambda f: ppl(f, "--device-map", "everywhere"), "--device-map"),
    ("device-map-and-device", lambda f: ppl(f, "--device-map", "auto"), "not both"),
    ("gpus-zero", lambda f: ppl(f, "--gpus", "0"), "--gpus"),
    ("gpus-too-many", lambda f: [a for a in ppl(f, "--gpus", "64") if a not in ("--device", "cpu")], "--gpus"),
    ("gpus-with-device", lambda f: ppl(f, "--gpus", "2"), "--gpus"),
    ("seed-not-int", lambda f: ppl(f, "--seed", "x"), "--seed"),
    ("unknown-option", lambda f: ppl(f, "--contexts", "64"), "--contexts"),
    ("rope-scaling", lambda f: ppl(f, "--rope-scaling", "cubic:2"), "rope"),
    ("rope-factor", lambda f: ppl(f, "--rope-scaling", "linear:zero"), "linear"),
    ("rope-yarn-option", lambda f: ppl(f, "--rope-scaling", "yarn:4,beta=2"), "not an option of yarn"),
    ("rope-yarn-factor", lambda f: ppl(f, "--rope-scaling", "yarn:0.5"), "at least 1"),
    ("rope-dynamic-original", lambda f: ppl(f, "--rope-scaling", "dynamic:2", "--original-ctx", "32"),
     "--original-ctx does not apply"),
    ("rope-original-zero", lambda f: ppl(f, "--rope-scaling", "yarn:2", "--original-ctx", "0"), "--original-ctx"),
    ("ctx-beyond-rope", lambda f: ppl(f, "--ctx", "4096"), "--rope-scaling yarn:"),
    ("sweep-rope-scaling", lambda f: ["sweep", "--rope-scaling", "ntk:2", "--dry-run"], "unknown --rope-scaling"),
    ("bench-rope-scaling", lambda f: ["bench", "model", "--shape", "smollm2-135m", "--rope-scaling", "llama3:8,x=1"],
     "not an option of llama3"),
    ("adapter-missing", lambda f: ppl(f, "--adapter", str(f / "nowhere")), "nowhere"),
    ("adapter-not-adapter", lambda f: ppl(f, "--adapter", str(f / "empty_dir")), "adapter"),
    ("merge-without-adapter", lambda f: ppl(f, "--merge-adapter"), "--adapter"),
    ("out-is-a-file", lambda f: ppl(f)[:-1] + [str(f / "a_file")], "--out"),
    # ---- ppl: models
    ("model-missing", lambda f: ppl(f, model=f / "nowhere"), "does not exist"),
    ("model-text-file", lambda f: ppl(f, model=f / "not_a_model.txt"), "not a GGUF"),
    ("model-no-config", lambda f: ppl(f, model=f / "no_config"), "config.json"),
    ("model-bad-config", lambda f: ppl(f, model=f / "bad_config"), "config"),
    ("model-not-causal", lambda f: ppl(f, model=f / "not_causal"), "causal"),
    ("model-no-weights", lambda f: ppl(f, model=f / "no_weights"), "weights"),
    ("gguf-corrupt", lambda f: ppl(f, model=f / "corrupt.gguf"), "gguf"),
    ("gguf-empty", lambda f: ppl(f, model=f / "empty.gguf"), "gguf"),
    # ---- ppl: tasks and data
    ("task-unknown", lambda f: ["ppl", "--model", str(f.model), "--task", "pg20", "--device", "cpu"], "unknown task"),
    ("task-file-missing", lambda f: ppl(f, "--task", str(f / "nowhere.yaml")), "does not exist"),
    ("task-missing-field", lambda f: ppl(f, "--task", str(f / "no_source.yaml")), "source"),
    ("task-wrong-type", lambda f: ppl(f, "--task", str(f / "bad_type.yaml")), "floppy"),
    ("task-syntax", lambda f: ppl(f, "--task", str(f / "syntax.yaml")), "YAML"),
    ("task-encoding", lambda f: ppl(f, "--task", str(f / "latin1.yaml")), "UTF-8"),
    ("task-data-missing", lambda f: ppl(f, "--task", str(f / "missing_path.yaml")), "nowhere"),
    ("data-missing", lambda f: ppl(f, data=f / "nowhere"), "no such file"),
    ("data-empty-folder", lambda f: ppl(f, data=f / "empty_dir"), "holds no files"),
    ("data-empty-file", lambda f: ppl(f, data=f / "empty.txt"), "empty.txt"),
    ("data-encoding", lambda f: ppl(f, data=f / "latin1.txt"), "UTF-8"),
    ("data-truncated-jsonl", lambda f: ppl(f, data=f / "bad.jsonl"), "bad.jsonl"),
    ("data-jsonl-field", lambda f: ppl(f, data=f / "no_text_field.jsonl"), "text"),
    ("data-truncated-gz", lambda f: ppl(f, data=f / "truncated.jsonl.gz"), "truncated.jsonl.gz"),
    ("data-corrupt-parquet", lambda f: ppl(f, data=f / "corrupt.parquet"), "corrupt.parquet"),
    ("data-bin-beyond-vocab", lambda f: ppl(f, data=f / "beyond_vocab.bin"), "beyond the tokenizer"),
    ("data-bin-odd", lambda f: ppl(f, data=f / "odd.bin"), "uint16"),
    # its records would be read as documents by the next run
    ("out-inside-data", lambda f: ppl(f, data=f / "texts")[:-1] + [str(f / "texts" / "results")],
     "is inside the --data folder"),
    ("out-is-data", lambda f: ppl(f, data=f / "texts")[:-1] + [str(f / "texts")], "is the --data folder"),
    ("original-ctx-alone", lambda f: ppl(f, "--original-ctx", "1024"), "give --rope-scaling too"),
    ("finetune-original-ctx-alone", lambda f: finetune(f, "--original-ctx", "1024", "--out", str(f / "ft-rope")),
     "give --rope-scaling too"),
    ("sweep-original-ctx-alone", lambda f: ["sweep", "--model", str(f.model), "--data", str(f.data), "--ctx", "64",
                                            "--device", "cpu", "-q", "--original-ctx", "1024",
                                            "--out", str(f.root / "sweep-rope")], "give --rope-scaling too"),
    # two tasks of one name: their records and table rows could not be told apart
    ("data-same-name", lambda f: ppl(f, "--data", str(f / "other" / "texts"), data=f / "texts"),
     "are both the task 'texts'"),
    ("task-twice", lambda f: ppl(f, "--task", "pg19_sample", "--task", "pg19_sample"), "are both the task"),
    # ---- table
    ("table-nothing", lambda f: ["table"], "nothing to tabulate"),
    ("table-missing", lambda f: ["table", str(f / "nowhere")], "no such result file"),
    ("table-empty-folder", lambda f: ["table", str(f / "empty_records")], "no result files"),
    ("table-truncated", lambda f: ["table", str(f / "truncated.json")], "not a valid result file"),
    ("table-not-record", lambda f: ["table", str(f / "not_record.json")], "missing"),
    ("table-encoding", lambda f: ["table", str(f / "latin1.json")], "not a valid result file"),
    ("table-format", lambda f: ["table", str(f / "records"), "--format", "docx"], "--format"),
    ("table-metric", lambda f: ["table", str(f / "records"), "--metric", "accuracy"], "--metric"),
    ("table-reference", lambda f: ["table", str(f / "records"), "--reference", "nope"], "unknown reference"),
    ("table-output-over-a-record", lambda f: ["table", str(f / "records_b"), "-o",
                                              str(sorted((f / "records").glob("*.json"))[0])],
     "holds a scca-eval result record"),
    ("table-digits", lambda f: ["table", str(f / "records"), "--digits", "many"], "--digits"),
    # ---- compare
    ("compare-one-arg", lambda f: ["compare", str(f / "records")], "NEW"),
    ("compare-missing", lambda f: ["compare", str(f / "records"), str(f / "nowhere")], "no such result file"),
    ("compare-incomparable", lambda f: ["compare", str(f / "records"), str(f / "records_b")], "tokenizer"),
    ("compare-gate-value", lambda f: ["compare", str(f / "records"), str(f / "records"), "--max-regression", "x"],
     "--max-regression"),
    ("compare-gate-nan", lambda f: ["compare", str(f / "records"), str(f / "records"), "--max-regression", "nan"],
     "--max-regression must be a finite number"),
    ("compare-json-over-a-record", lambda f: ["compare", str(f / "records"), str(f / "records"), "--json",
                                              str(sorted((f / "records").glob("*.json"))[0])],
     "is one of the files this report reads"),
    ("compare-samples", lambda f: ["compare", str(f / "records"), str(f / "records"), "--bootstrap-samples", "5"],
     "--bootstrap-samples"),
    ("compare-truncated", lambda f: ["compare", str(f / "truncated.json"), str(f / "records")],
     "not a valid result file"),
    # ---- plot
    ("plot-no-out", lambda f: ["plot", str(f / "records")], "--out"),
    ("plot-missing", lambda f: ["plot", str(f / "nowhere"), "--out", str(f / "plots" / "p")], "no such result file"),
    ("plot-metric", lambda f: ["plot", str(f / "records"), "--out", str(f / "plots" / "p"), "--metric", "x"],
     "--metric"),
    # ---- sweep
    ("sweep-file-missing", lambda f: ["sweep", str(f / "nowhere.yaml"), "--dry-run"], "does not exist"),
    ("sweep-syntax", lambda f: ["sweep", str(f / "sweep_syntax.yaml"), "--dry-run"], "YAML"),
    ("sweep-not-mapping", lambda f: ["sweep", str(f / "sweep_list.yaml"), "--dry-run"], "mapping"),
    ("sweep-unknown-setting", lambda f: ["sweep", str(f / "sweep_unknown.yaml"), "--dry-run"], "modles"),
    ("sweep-ctx-type", lambda f: ["sweep", str(f / "sweep_ctx.yaml"), "--dry-run"], "ctx"),
    ("sweep-stride", lambda f: ["sweep", "--ctx", "64", "--stride", "100", "--data", str(f.data), "--dry-run"],
     "--stride"),
    ("sweep-pattern", lambda f: ["sweep", "--pattern", "s3", "--data", str(f.data), "--dry-run"], "unknown pattern"),
    ("sweep-data", lambda f: ["sweep", "--data", str(f / "nowhere"), "--dry-run"], "no such file"),
    ("sweep-out-is-a-file", lambda f: ["sweep", "--model", str(f.model), "--data", str(f.data), "--ctx", "64",
                                       "--max-tokens", "128", "--device", "cpu", "-q", "--out", str(f / "a_file")],
     "--out"),
    ("sweep-out-inside-data", lambda f: ["sweep", "--model", str(f.model), "--data", str(f / "texts"), "--ctx", "64",
                                         "--device", "cpu", "-q", "--out", str(f / "texts" / "sweep")],
     "is inside the --data folder"),
    # ---- finetune
    ("finetune-out-inside-data", lambda f: finetune(f, "--data", str(f / "texts"), "--out", str(f / "texts" / "ft")),
     "is inside the --data folder"),
    ("finetune-out-inside-eval-data", lambda f: finetune(f, "--eval-data", str(f / "texts"), "--out",
                                                         str(f / "texts" / "ft")), "is inside the --eval-data folder"),
    ("finetune-log-dir-inside-data", lambda f: finetune(f, "--data", str(f / "texts"), "--out", str(f / "ft"),
                                                        "--log-dir", str(f / "texts" / "logs")),
     "--log-dir"),
    ("finetune-eval-data-missing", lambda f: finetune(f, "--eval-data", str(f / "nowhere"), "--out", str(f / "ft")),
     "--eval-data"),
    # ---- output paths that cannot be written
    ("table-output-in-a-file", lambda f: ["table", str(f / "records"), "-o", str(f / "a_file" / "t.md")],
     "a_file is a file, not a folder"),
    ("compare-output-is-a-folder", lambda f: ["compare", str(f / "records"), str(f / "records"), "-o",
                                              str(f / "empty_dir")], "empty_dir: it is a folder"),
    ("plot-out-in-a-file", lambda f: ["plot", str(f / "records"), "--out", str(f / "a_file" / "p")],
     "a_file is a file, not a folder"),
    # ---- patterns
    ("patterns-list-ctx", lambda f: ["patterns", "list", "--ctx", "0"], "--ctx"),
    ("patterns-show-unknown", lambda f: ["patterns", "show", "s3"], "unknown pattern"),
    ("patterns-show-heads", lambda f: ["patterns", "show", "s2", "--heads", "0"], "--heads"),
    ("patterns-show-chunk", lambda f: ["patterns", "show", "s2", "--ctx", "64", "--chunk-size", "65"],
     "--chunk-size"),
    ("patterns-export-folder", lambda f: ["patterns", "export", "s2", "--ctx", "64", "--heads", "2", "--out",
                                          str(f / "nowhere" / "m.npy")], "does not exist"),
    ("patterns-export-under-a-file", lambda f: ["patterns", "export", "s2", "--ctx", "64", "--heads", "2", "--out",
                                                str(f / "a_file" / "m.npy")], "a_file is a file, not a folder"),
    ("patterns-export-no-out", lambda f: ["patterns", "export", "s2"], "--out"),
    ("patterns-export-to-a-folder", lambda f: ["patterns", "export", "s2", "--ctx", "64", "--heads", "2", "--out",
                                               str(f / "empty_dir")], "directory"),
    ("patterns-png-folder", lambda f: ["patterns", "show", "s2", "--ctx", "64", "--heads", "2", "--png",
                                       str(f / "nowhere" / "m.png")], "does not exist"),
    ("patterns-dilation", lambda f: ["patterns", "export", "sda", "--dilation", "0", "--out", str(f / "m.npy")],
     "--dilation"),
]


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _as_param(case):
    values, marks = (case.values, case.marks) if hasattr(case, "marks") else (case, ())
    return pytest.param(*values, marks=marks, id=values[0])


@pytest.mark.parametrize("name, argv, fragment", [_as_param(c) for c in CASES])
def test_bad_input_gives_one_line_and_status_2(name, argv, fragment, files, capsys):
    before = _tree(files.root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files))
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("scca-eval: error: ")
    assert "Traceback" not in captured.err
    assert fragment.lower() in lines[0].lower(), lines[0]
    assert _tree(files.root) == before  # no record, progress, partial or temporary file


@pytest.mark.parametrize("argv, fragment", [
    (["ppl", "--ctx", "1"], "at least 2"),
    (["table", "does-not-exist"], "no such result file"),
])
def test_bad_input_from_a_shell(argv, fragment, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "scca_eval", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []
