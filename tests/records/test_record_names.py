"""Two cells that differ in any setting of their identity never share a record file.

Each setting that enters a record's identity is run twice into one --out folder, once
plain and once changed: both records must be there afterwards, the first one unchanged.
A record of another identity that no file-name tag tells apart (two models whose folders
have one name) is kept too: the later record goes to a name with a digest of its identity.
"""

import json

import pytest
import torch

from scca_eval.records import identity_difference
from scca_eval.records import read_record, record_filename, record_identity, record_path, write_record

from helpers import make_record, run_cli

BASE = ["--ctx", "64", "--max-tokens", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(base, lora).save_pretrained(folder)
    return folder


CHANGES = {
    "adapter": ([], lambda a: ["--adapter", str(a)], "the adapter"),
    "rope-scaling": ([], lambda a: ["--rope-scaling", "linear:2"], "the RoPE scaling"),
    "dilation": (["--pattern", "sda"], lambda a: ["--pattern", "sda", "--dilation", "4"], "the pattern settings"),
    "chunk-size": (["--pattern", "s2"], lambda a: ["--pattern", "s2", "--chunk-size", "16"], "the pattern settings"),
    "bos": ([], lambda a: ["--bos"], "the BOS setting"),
    "max-tokens": ([], lambda a: ["--max-tokens", "320"], "the token budget"),
    "dtype": ([], lambda a: ["--dtype", "bfloat16"], "the dtype"),
}


@pytest.mark.parametrize("setting", sorted(CHANGES))
def test_each_setting_writes_a_record_of_its_own(setting, tiny_model_dir, sample_data_dir, adapter_dir, tmp_path,
                                                 capsys):
    plain, changed, words = CHANGES[setting]
    common = ["ppl", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), *BASE, "--out", str(tmp_path)]
    code, _, err = run_cli(common + plain, capsys)
    assert code == 0, err
    (first,) = sorted(tmp_path.glob("*.json"))
    before = first.read_text()

    code, _, err = run_cli(common + changed(adapter_dir), capsys)
    assert code == 0, err
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2, [f.name for f in files]
    assert first.read_text() == before  # the first record is untouched
    (second,) = [f for f in files if f != first]
    difference = identity_difference(read_record(first), read_record(second))
    assert difference is not None and words in difference
    assert "note:" not in err  # told apart by the readable name, not by the fallback digest


def test_a_changed_setting_run_again_replaces_only_its_own_record(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    common = ["ppl", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), *BASE, "--out", str(tmp_path)]
    for extra in ([], ["--bos"], ["--bos"]):
        assert run_cli(common + extra, capsys)[0] == 0
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_chunk_size_given_to_a_whole_run_leaves_full_attention_as_it_is(tiny_model_dir, sample_data_dir, tmp_path,
                                                                           capsys):
    """Full attention has no chunks: its record with --chunk-size is the record without it (the
    same file, replaced), so a baseline without --chunk-size compares with it."""
    common = ["ppl", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), *BASE, "--out", str(tmp_path)]
    assert run_cli(common + ["--pattern", "full"], capsys)[0] == 0
    (plain,) = tmp_path.glob("*.json")
    code, _, err = run_cli(common + ["--pattern", "full,s2", "--chunk-size", "16"], capsys)
    assert code == 0, err
    names = sorted(f.name for f in tmp_path.glob("*.json"))
    assert len(names) == 2 and plain.name in names and any("__s2__" in n and "__G16" in n for n in names), names
    assert read_record(plain)["config"]["pattern"]["chunk_size"] is None


def test_a_full_attention_record_made_with_a_chunk_size_is_the_same_cell(tiny_model_dir, sample_data_dir, tmp_path,
                                                                        capsys):
    """Records written before --chunk-size was dropped for full attention stored it: read back,
    they are full attention's plain cell, so compare pairs them with a record made now."""
    from scca_eval.patterns.parse import resolve_pattern
    from scca_eval.records.store import DEFAULT_CHUNK_RATIO_TEXT, FULL_ATTENTION_GROUPS

    stored = resolve_pattern("full").to_dict()
    assert (stored["groups"], stored["chunk_ratio"]) == (FULL_ATTENTION_GROUPS, DEFAULT_CHUNK_RATIO_TEXT)
    new, base = tmp_path / "new", tmp_path / "base"
    code, _, err = run_cli(["ppl", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), *BASE,
                            "--pattern", "full", "--out", str(new)], capsys)
    assert code == 0, err
    (made,) = new.glob("*.json")
    older = json.loads(made.read_text())
    older["config"]["pattern"]["chunk_size"] = 16  # as the full record of `--pattern full,s2 --chunk-size 16` was
    base.mkdir()
    (base / made.name.replace(".json", "__G16.json")).write_text(json.dumps(older))
    code, out, err = run_cli(["compare", str(base), str(new)], capsys)
    assert code == 0 and "Only in" not in out and "| full | 64 |" in out, out + err


def _with_weights(record, digest):
    record["config"]["model"] = {"fingerprint": {"digest": digest}, "adapter": None, "rope_scaling": None}
    return record


def test_a_difference_no_tag_names_keeps_both_records(tmp_path):
    said = []
    first = _with_weights(make_record(model="ckpt"), "sha256:aaa")
    second = _with_weights(make_record(model="ckpt", ppl=11.0), "sha256:bbb")
    assert record_filename(first) == record_filename(second)
    path_one = write_record(first, tmp_path, said.append)
    path_two = write_record(second, tmp_path, said.append)
    assert path_one != path_two and path_one.exists() and path_two.exists()
    assert json.loads(path_one.read_text())["metrics"] == first["metrics"]
    assert len(said) == 1 and "the model's weights" in said[0]
    # the same identity again replaces its own file, and says nothing
    assert write_record(first, tmp_path, said.append) == path_one and len(said) == 1


def test_the_name_of_a_stopped_run_is_left_to_it(tmp_path):
    """A stopped run (its progress file) keeps its record's name: a cell of another identity
    goes to a digest name, one of the same identity continues under the name it has."""
    said = []
    first = _with_weights(make_record(model="ckpt"), "sha256:aaa")
    second = _with_weights(make_record(model="ckpt", ppl=11.0), "sha256:bbb")
    plain = tmp_path / record_filename(first)
    def identity(record):  # as a progress file holds it
        return json.loads(json.dumps(record_identity(record)))

    stopped = {plain: identity(first)}
    assert record_path(first, tmp_path, said.append, stopped=stopped) == plain
    taken = record_path(second, tmp_path, said.append, stopped=stopped)
    assert taken != plain and taken.parent == tmp_path
    assert len(said) == 1 and "stopped run" in said[0] and "the model's weights" in said[0]
    # the second one stopped under its digest name, and the plain name now holds the first record
    write_record(first, tmp_path)
    assert record_path(second, tmp_path, stopped={taken: identity(second)}) == taken


def test_passkey_records_of_other_trials_have_names_of_their_own():
    def passkey_record(trials):
        record = make_record(task="passkey")
        record["config"].update(protocol="passkey", passkey={"trials_per_depth": trials, "depths": 5, "seed": 0})
        return record

    assert record_filename(passkey_record(10)) == "m__passkey__full__ctx1024.json"
    assert record_filename(passkey_record(3)) == "m__passkey__full__ctx1024__trials3-depths5-seed0.json"
    assert "passkey trials" in identity_difference(passkey_record(10), passkey_record(3))


def test_a_record_under_an_older_name_is_replaced_not_doubled(tmp_path):
    """A record written before file names carried their tags (here: a --max-tokens record under
    the plain name) is the one a run again of the same settings replaces."""
    record = make_record(model="default")
    record["config"]["max_tokens"] = 2048
    old = tmp_path / "default__pg19_sample__full__ctx1024.json"
    old.write_text(json.dumps(record))
    rerun = json.loads(json.dumps(record))
    rerun["metrics"]["perplexity"] = 10.5
    assert write_record(rerun, tmp_path) == old
    assert [p.name for p in tmp_path.glob("*.json")] == [old.name]
    assert json.loads(old.read_text())["metrics"]["perplexity"] == 10.5
    other = json.loads(json.dumps(record))
    other["config"]["max_tokens"] = 4096  # another identity: a file of its own, the old one kept
    assert write_record(other, tmp_path).name == "default__pg19_sample__full__ctx1024__max4096.json"
    assert len(list(tmp_path.glob("*.json"))) == 2


def _passkey_record(schema, tokenizer_fingerprint, tokenizer_name="tok"):
    record = make_record(task="passkey")
    record["schema"] = schema
    record["config"].update(protocol="passkey", passkey={"trials_per_depth": 10, "depths": 5, "seed": 0},
                            tokenizer_fingerprint=tokenizer_fingerprint)
    record["config"]["model"]["tokenizer"] = {"name": tokenizer_name, "vocab_size": 100, "adds_bos": False,
                                              "fingerprint": tokenizer_fingerprint}
    return record


def test_a_schema_1_passkey_record_is_replaced_by_the_same_cell_run_again(tmp_path):
    """Passkey records of schema 1 named the tokenizer by another digest: the same cell run
    again replaces such a record (their tokenizer summaries agree) rather than writing a twin
    that tables would refuse; a record of another tokenizer is kept."""
    old = _passkey_record(1, "sha256:" + "a" * 64)
    path = write_record(old, tmp_path)
    new = _passkey_record(2, "b" * 64)
    assert identity_difference(old, new) is None
    assert write_record(new, tmp_path) == path and json.loads(path.read_text())["schema"] == 2
    other = _passkey_record(2, "c" * 64, tokenizer_name="other")
    assert identity_difference(new, other) == "the tokenizer"
    write_record(old, tmp_path)
    assert identity_difference(old, other) == "the tokenizer"
    assert write_record(other, tmp_path) != path and len(list(tmp_path.glob("*.json"))) == 2


def test_existing_records_are_of_one_kind_and_keyed_for_reuse(tmp_path):
    """The one helper sweeps and passkey runs read an --out folder with."""
    from scca_eval.records import config_key, existing_records

    perplexity, passkey = make_record(), _passkey_record(2, "b" * 64)
    write_record(perplexity, tmp_path)
    write_record(passkey, tmp_path)
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    said = []
    found = existing_records(tmp_path, said.append)
    assert list(found) == [config_key(perplexity)] and found[config_key(perplexity)]["task"] == "pg19_sample"
    found = existing_records(tmp_path, said.append, passkey=True)
    assert list(found) == [config_key(passkey)] and found[config_key(passkey)]["task"] == "passkey"
    assert len(said) == 2 and all(line.startswith(f"ignoring {tmp_path / 'broken.json'}") for line in said)
    assert existing_records(tmp_path / "missing", said.append) == {}
