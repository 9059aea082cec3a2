"""`scca-eval sweep`: one record per cell, skipped when it exists with the same configuration,
so an interrupted sweep resumes and ends with the records of an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from scca_eval.errors import UserError
from scca_eval.records import load_records
from scca_eval.evaluation.sweep import config_key, load_sweep_file, make_sweep, run_sweep, split_patterns
from helpers import run_cli

CELLS = 4  # 2 patterns × 2 ctx × 1 task


class Interrupted(Exception):
    pass


class CountingProgress:
    """An api.Progress that counts evaluated cells and can stop the sweep inside one."""

    def __init__(self, stop_in_cell: int | None = None):
        self.stop_in_cell = stop_in_cell
        self.labels: list[str] = []

    def begin(self, label, total_tokens, done_tokens=0):
        self.labels.append(label)

    def advance(self, tokens):
        if self.stop_in_cell is not None and len(self.labels) == self.stop_in_cell:
            raise Interrupted  # part-way through this cell: its record must not appear

    def end(self):
        pass


def settings(model_dir, data_dir, out, **extra):
    return {"models": [str(model_dir)], "patterns": ["full", "s2"], "ctx": [64, 128], "data": [str(data_dir)],
            "max_tokens": 384, "device": "cpu", "out": str(out), **extra}


def comparable(record):
    """A record without what legitimately differs between two runs (timings, location)."""
    return {key: value for key, value in record.items() if key not in ("runtime", "path")}


def records_by_file(folder):
    return {p.name: comparable(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, sample_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    progress = CountingProgress()
    result = run_sweep(make_sweep(settings(tiny_model_dir, sample_data_dir, out)), progress=progress)
    assert (result.computed, result.reused, len(progress.labels)) == (CELLS, 0, CELLS)
    return out, result


def test_one_record_per_cell(uninterrupted):
    out, result = uninterrupted
    files = records_by_file(out)
    assert len(files) == CELLS
    cells = {(r["pattern"], r["ctx"]) for r in files.values()}
    assert cells == {("full", 64), ("full", 128), ("s2", 64), ("s2", 128)}
    assert [comparable(r) for r in result.records] == [files[r["path"].split("/")[-1]] for r in result.records]
    # the patterns really ran: s2 differs from full on the same tokens
    by_cell = {(r["pattern"], r["ctx"]): r for r in files.values()}
    assert by_cell[("full", 64)]["metrics"]["tokens"] == by_cell[("s2", 64)]["metrics"]["tokens"]
    assert by_cell[("full", 64)]["metrics"]["perplexity"] != by_cell[("s2", 64)]["metrics"]["perplexity"]


def test_resumed_sweep_equals_uninterrupted(uninterrupted, tiny_model_dir, sample_data_dir, tmp_path):
    reference_out, _ = uninterrupted
    out = tmp_path / "resumed"
    sweep = make_sweep(settings(tiny_model_dir, sample_data_dir, out))
    with pytest.raises(Interrupted):
        run_sweep(sweep, progress=CountingProgress(stop_in_cell=3))
    done = sorted(out.glob("*.json"))
    assert len(done) == 2  # two cells finished, the third was stopped part-way
    written_at = {p.name: p.stat().st_mtime_ns for p in done}

    lines = []
    progress = CountingProgress()
    result = run_sweep(sweep, progress=progress, log=lines.append)
    assert (result.computed, result.reused) == (2, 2)
    assert len(progress.labels) == 2                                  # only the missing cells ran
    assert {p.name: p.stat().st_mtime_ns for p in done} == written_at  # finished cells untouched
    assert sum(line.startswith("have ") for line in lines) == 2
    assert records_by_file(out) == records_by_file(reference_out)

    progress = CountingProgress()
    result = run_sweep(sweep, progress=progress)
    assert (result.computed, result.reused, progress.labels) == (0, CELLS, [])
    assert [comparable(r) for r in result.records] == [comparable(r) for r in load_records(
        [out / r["path"].split("/")[-1] for r in result.records])]


def test_changed_setting_recomputes(uninterrupted, tiny_model_dir, sample_data_dir, tmp_path):
    reference_out, _ = uninterrupted
    out = tmp_path / "changed"
    out.mkdir()
    for path in reference_out.glob("*.json"):
        (out / path.name).write_bytes(path.read_bytes())
    progress = CountingProgress()
    result = run_sweep(make_sweep(settings(tiny_model_dir, sample_data_dir, out, max_tokens=256)),
                       progress=progress)
    assert (result.computed, len(progress.labels)) == (CELLS, CELLS)
    # the new cells are records of their own, beside the earlier ones (nothing is replaced)
    budgets = sorted(r["config"]["max_tokens"] for r in load_records([out]))
    assert budgets == [256] * CELLS + [384] * CELLS

    # one corrupt record: only its cell is recomputed
    victim = sorted(out.glob("*__max256.json"))[0]
    victim.write_text("{truncated")
    lines, progress = [], CountingProgress()
    result = run_sweep(make_sweep(settings(tiny_model_dir, sample_data_dir, out, max_tokens=256)),
                       progress=progress, log=lines.append)
    assert (result.computed, result.reused) == (1, CELLS - 1)
    assert any(line.startswith(f"ignoring {victim}") for line in lines)
    assert json.loads(victim.read_text())["config"]["max_tokens"] == 256


def test_last_window_short_is_its_own_cell_and_equals_ppl(uninterrupted, tiny_model_dir, sample_data_dir,
                                                            tmp_path):
    from scca_eval import evaluate

    reference_out, _ = uninterrupted
    out = tmp_path / "short"
    out.mkdir()
    for path in reference_out.glob("*.json"):
        (out / path.name).write_bytes(path.read_bytes())
    result = run_sweep(make_sweep(settings(tiny_model_dir, sample_data_dir, out, last_window="short",
                                           patterns=["full"], ctx=[128])))
    assert (result.computed, result.reused) == (1, 0)  # the full-last-window record is not reused
    (record,) = [r for r in load_records([out]) if r["config"].get("last_window") == "short"]
    (direct,) = evaluate(str(tiny_model_dir), ctx=128, data=[str(sample_data_dir)], max_tokens=384, device="cpu",
                         last_window="short", out=None)
    assert record["metrics"]["perplexity"] == pytest.approx(direct["metrics"]["perplexity"], rel=1e-12)


def test_config_key_sees_every_setting(uninterrupted):
    out, _ = uninterrupted
    record = load_records([out])[0]
    key = config_key(record)
    assert config_key(json.loads(json.dumps(record))) == key
    changes = [("config", "data_fingerprint", "other"), ("config", "tokenizer_fingerprint", "other"),
               ("config", "max_tokens", 1), ("config", "add_bos", True), ("config", "dtype", "bfloat16"),
               ("config", "protocol", "longlora"), ("config", "bootstrap_seed", 5), (None, "stride", 7),
               (None, "ctx", 7), (None, "model", "elsewhere")]
    for section, field, value in changes:
        changed = json.loads(json.dumps(record))
        (changed[section] if section else changed)[field] = value
        assert config_key(changed) != key, field
    for field, value in (("fingerprint", {"digest": "sha256:other"}), ("adapter", {"path": "x"}),
                         ("rope_scaling", {"type": "linear", "factor": 2})):
        changed = json.loads(json.dumps(record))
        changed["config"]["model"][field] = value
        assert config_key(changed) != key, field
    changed = json.loads(json.dumps(record))
    changed["config"]["pattern"]["chunk_size"] = 16
    assert config_key(changed) != key
    changed = json.loads(json.dumps(record))
    changed["runtime"]["seconds"] = 123.0
    changed["config"]["batch_size"] = 99
    assert config_key(changed) == key  # speed settings do not change the number


def test_sweep_file_and_cli(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"models: [{tiny_model_dir}]\npatterns: [full]\nctx: 64\ndata: [{sample_data_dir}]\n"
                          f"max_tokens: 128\ndevice: cpu\nout: {tmp_path / 'ignored'}\n")
    code, stdout, err = run_cli(["sweep", str(sweep_file), "--pattern", "full,s2", "--out", str(out), "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name.split("__")[2] for p in out.glob("*.json")) == ["full", "s2"]  # options override the file
    assert not (tmp_path / "ignored").exists()
    assert "| full |" in stdout and "| s2 |" in stdout and "2 computed, 0 already" in err

    code, stdout, err = run_cli(["sweep", str(sweep_file), "--dry-run", "--ctx", "64,128"], capsys)
    assert code == 0 and len(stdout.strip().splitlines()) == 2 and "2 cell(s)" in err


def test_a_models_original_ctx_without_a_scaling_is_refused_before_any_model_runs(tiny_model_dir, sample_data_dir,
                                                                                   tmp_path, capsys):
    """--original-ctx given to every model, and only the first has a RoPE scaling: refused up
    front, not after the first model's records are written."""
    import shutil

    second = tmp_path / "second"
    shutil.copytree(tiny_model_dir, second)
    out = tmp_path / "out"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"models: [{{model: {tiny_model_dir}, rope_scaling: 'linear:2'}}, {second}]\n"
                          f"patterns: [full]\nctx: 64\ndata: [{sample_data_dir}]\nmax_tokens: 128\ndevice: cpu\n")
    code, _, err = run_cli(["sweep", str(sweep_file), "--original-ctx", "1024", "--out", str(out), "-q"], capsys)
    assert code == 2 and f"--original-ctx 1024 for {second}" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_two_custom_mixes_in_one_sweep(tiny_model_dir, sample_data_dir, tmp_path):
    """Each mix gets its own record, named custom-<first 8 hex digits of the sha256 of its groups>."""
    mixes = ("1/2 local + 1/2 cross(1)", "1/4 local + 3/4 shifted(3)")  # written in canonical form
    names = {mix: "custom-" + hashlib.sha256(mix.encode("utf-8")).hexdigest()[:8] for mix in mixes}
    out = tmp_path / "mixes"
    sweep_settings = {"models": [str(tiny_model_dir)], "patterns": list(mixes), "ctx": [64],
                      "data": [str(sample_data_dir)], "max_tokens": 128, "device": "cpu", "out": str(out)}
    sweep = make_sweep(sweep_settings)
    assert [label.split(" · ")[2] for label in sweep.cell_labels()] == list(names.values())
    lines, progress = [], CountingProgress()
    result = run_sweep(sweep, progress=progress, log=lines.append)
    assert (result.computed, result.reused) == (2, 0)
    files = records_by_file(out)
    assert sorted(name.split("__")[2] for name in files) == sorted(names.values())
    by_name = {record["pattern"]: record for record in files.values()}
    for mix, name in names.items():
        assert by_name[name]["config"]["pattern"]["groups"] == mix
        assert sum(name in line for line in lines) == 1  # one "wrote" line per mix, labelled by its name
    # the mixes really differ: same tokens, different perplexity
    first, second = (by_name[name]["metrics"] for name in names.values())
    assert first["tokens"] == second["tokens"] and first["perplexity"] != second["perplexity"]
    # run again: both cells are found, none is recomputed
    assert run_sweep(make_sweep(sweep_settings)).reused == 2


@pytest.mark.parametrize("content,message", [
    ("modles: [default]\n", "unknown setting 'modles'"),
    ("ctx: [1024, big]\n", "ctx: "),
    ("patterns: [nonsense]\n", "unknown"),
    ("ctx: [1]\n", "--ctx"),
    ("stride: 4096\nctx: [1024]\n", "--stride"),
    ("max_tokens: 0\n", "--max-tokens"),
    ("last_window: half\n", "unknown --last-window 'half'"),
    ("tasks: [no_such_task]\n", "unknown task"),
    ("models: [{model: default, colour: red}]\n", "unknown model option 'colour'"),
    ("[1, 2]\n", "YAML mapping"),
])
def test_bad_sweep_files_exit_2(tmp_path, capsys, content, message):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(content)
    code, stdout, err = run_cli(["sweep", str(sweep_file), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_sweep_file():
    with pytest.raises(UserError, match="does not exist"):
        load_sweep_file("no/such/sweep.yaml")


def test_split_patterns():
    assert split_patterns(["full,s2", "1/4 local + 1/4 cross(1) + 1/2 dilated(2,0)", " sda ,"]) == [
        "full", "s2", "1/4 local + 1/4 cross(1) + 1/2 dilated(2,0)", "sda"]


def test_committed_results_command_is_consistent(monkeypatch, capsys):
    """results/README.md, results/reproduce.sh and results/smollm2-135m.yaml describe one run."""
    import re
    import shlex
    from pathlib import Path

    from scca_eval.cli import cli

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    readme = (repo / "results" / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()
             if line.strip().startswith("scca-eval ")]
    readme_commands = [shlex.split(line)[1:] for line in lines]
    from_file, *report_commands, from_options = readme_commands
    assert from_file == ["sweep", "results/smollm2-135m.yaml"] and from_options[0] == "sweep"

    script = (repo / "results" / "reproduce.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    script_commands = [shlex.split(line.replace('"$PYTHON" -m scca_eval', "").replace("$NAME", "results/smollm2-135m"))
                       for line in script.splitlines() if line.startswith('"$PYTHON" -m scca_eval')]
    assert script_commands[0] == [*from_file, "$@"]  # extra arguments go to the sweep
    assert script_commands[1:] == report_commands

    for name, *args in report_commands:
        with cli.get_command(None, name).make_context(name, list(args)):
            pass
    outputs = []
    for command in (from_file, from_options):
        code, out, err = run_cli([*command, "--dry-run"], capsys)
        assert code == 0, err
        outputs.append((out, err))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][0].splitlines()) == 48 and "max_tokens=147456" in outputs[0][1]


def test_one_list_syntax_for_every_multi_value_option():
    """Commas between items (not inside a rule's parentheses), and repeating adds up."""
    import click

    from scca_eval.cli.options import ints_callback, names_callback

    assert names_callback(None, None, ("full,s2", "1/2 local + 1/2 dilated(2,0)")) == [
        "full", "s2", "1/2 local + 1/2 dilated(2,0)"]
    assert ints_callback(None, None, ("1024,2048", "4096")) == [1024, 2048, 4096]
    with pytest.raises(click.BadParameter, match="'2k' is not a whole number"):
        ints_callback(None, None, ("1024,2k",))


def test_ppl_takes_a_comma_separated_pattern_list(tmp_path, capsys):
    """`ppl --pattern full,s2` means two patterns (as in sweep); a malformed mix says how to
    give several patterns."""
    from scca_eval.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ppl", "--pattern", "full,s2", "--pattern", "1/2 local 1/2 cross", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'1/2 local 1/2 cross'" in err and "'full,s2'" not in err
    assert "-p full,s2 or -p full -p s2" in err


def test_an_unwritable_out_folder_is_refused_before_any_work(tmp_path):
    from scca_eval.files import check_writable_folder

    folder = Path("/proc/1/scca-eval-out")
    if not Path("/proc/1").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(UserError, match="cannot write in /proc/1"):
        check_writable_folder(folder)
    check_writable_folder(tmp_path / "new" / "folder")  # a folder that can be made is fine
    assert not (tmp_path / "new").exists()               # and the check makes nothing
