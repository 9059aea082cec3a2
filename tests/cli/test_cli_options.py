"""The options several commands share (cli/options.py, cli/launch.py): the same names, types and
choices in every command, and the same one-line refusal of a bad value."""

from __future__ import annotations

import click
import pytest

from scca_eval.choices import ATTENTION_BACKENDS, DTYPES, PRESETS
from scca_eval.cli import cli, main
from scca_eval.cli.options import DEVICE_HELP, names_callback


def _commands(group=cli, path=()):
    """Every leaf command as (its words after scca-eval, the command)."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))
        else:
            yield path + (name,), command


def _option(command, flag):
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None)


def _with(flag):
    return {" ".join(path): option for path, command in _commands() if (option := _option(command, flag))}


EVALUATING = {"ppl", "sweep", "passkey", "finetune", "lm-eval"}
BENCHES = {"bench attention", "bench model", "bench train"}


def test_dtype_is_one_choice_everywhere():
    options = _with("--dtype")
    assert set(options) == EVALUATING | BENCHES
    for name, option in options.items():
        assert isinstance(option.type, click.Choice), name
        assert list(option.type.choices) == list(DTYPES) and not option.type.case_sensitive, name
        assert option.default is None and "Default: float32 on CPU, bfloat16 on GPU." in option.help, name


def test_device_is_one_option_everywhere():
    options = _with("--device")
    assert set(options) == EVALUATING | {"bench model", "bench train"}
    for name, option in options.items():
        assert option.type is click.STRING and option.default is None, name
        assert option.help.startswith(DEVICE_HELP), name
    # only the commands that start processes say what each process takes
    assert {name for name, option in options.items() if "--gpus" in option.help} == set(_with("--gpus"))


def test_pattern_and_its_settings_are_the_same_everywhere():
    patterns = {name: option for name, option in _with("--pattern").items() if name not in BENCHES}
    assert set(patterns) == EVALUATING
    for name, option in patterns.items():
        assert option.opts == ["--pattern", "-p"], name
        assert all(preset in option.help for preset in PRESETS), name
        assert "custom mix such as" in option.help and "scca-eval patterns list" in option.help, name
        if option.multiple:  # several: the one list syntax
            assert option.name == "patterns" and option.callback is names_callback, name
        else:
            assert option.name == "pattern" and option.default == "full", name
    assert {name for name, option in patterns.items() if not option.multiple} == {"finetune", "lm-eval"}

    sized = EVALUATING | {"patterns list", "patterns show", "patterns export"}
    for flag in ("--chunk-size", "--dilation"):
        options = _with(flag)
        assert set(options) == sized, flag
        assert all(option.type is click.INT and option.default is None for option in options.values()), flag
    backends = _with("--attention-backend")
    assert set(backends) == EVALUATING
    for name, option in backends.items():
        assert list(option.type.choices) == list(ATTENTION_BACKENDS), name
        assert option.default == ("auto" if name != "sweep" else None), name  # a sweep file may set it


def test_the_model_loading_options_are_shared():
    for flag in ("--model", "--adapter", "--merge-adapter", "--rope-scaling"):
        helps = {name: option.help for name, option in _with(flag).items() if name not in BENCHES}
        if flag == "--model":
            helps = {name: text.removeprefix("Base model: ") for name, text in helps.items() if name != "sweep"}
        if flag in ("--adapter", "--merge-adapter"):
            helps = {name: text for name, text in helps.items() if name != "sweep"}  # per model of a grid
        stems = {text.split(" Also 'longlora'")[0].split(" For every model")[0] for text in helps.values()}
        assert len(stems) == 1, (flag, helps)
    ppl, passkey = (dict(cli.commands)[name] for name in ("ppl", "passkey"))
    loading = ["model", "adapter", "merge_adapter", "rope_scaling", "original_ctx", "trainable_params",
               "tokenizer_path", "trust_remote_code"]
    for name in loading:
        first, second = (next(p for p in c.params if p.name == name) for c in (ppl, passkey))
        assert (first.opts, first.help, first.type.name, first.default) == \
            (second.opts, second.help, second.type.name, second.default), name


def _refused(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


REQUIRED = {"finetune": ["--ctx", "64", "--out", "run"], "lm-eval": []}


@pytest.mark.parametrize("command", sorted(EVALUATING | BENCHES))
def test_every_command_refuses_the_same_bad_dtype(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _refused([*command.split(), *REQUIRED.get(command, []), "--dtype", "int8"], capsys)
    assert "--dtype" in line and "'int8' is not one of" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["ppl", "sweep", "passkey", "finetune", "patterns show"])
def test_every_command_refuses_the_same_unknown_pattern(command, capsys, tmp_path, monkeypatch):
    """The same name is refused with the same line, before a model is loaded (the model given
    does not exist, so loading it would say something else)."""
    monkeypatch.chdir(tmp_path)
    args = {"patterns show": ["patterns", "show", "s3"], "sweep": ["sweep", "-p", "s3", "--dry-run"],
            "finetune": ["finetune", "-p", "s3", "--ctx", "64", "--out", "run", "--model", "nowhere"]}
    argv = args.get(command, [command, "-p", "s3", "--model", "nowhere", "--ctx", "64", "--no-write"])
    line = _refused(argv, capsys)
    assert "unknown pattern 's3'" in line, line


@pytest.mark.parametrize("command", ["ppl", "finetune"])
@pytest.mark.parametrize("gpus, fragment", [("0", "--gpus must be at least 1"),
                                            ("64", "--gpus 64 asked for, but this machine has"),
                                            ("2 --device cpu", "cannot take --device cpu")])
def test_a_gpus_error_is_one_line_and_status_2_from_each_command(command, gpus, fragment, capsys, tmp_path,
                                                                 monkeypatch):
    assert set(_with("--gpus")) == {"ppl", "finetune"}
    monkeypatch.chdir(tmp_path)
    argv = [command, "--ctx", "64", *REQUIRED.get(command, []), "--gpus", *gpus.split()]
    line = _refused(argv, capsys)
    assert fragment in line, line
    if gpus == "64":  # the way to run several CPU processes names this command
        assert f"-m scca_eval {command} --device cpu" in line, line
    assert list(tmp_path.iterdir()) == []
