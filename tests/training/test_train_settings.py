"""TrainSettings: bad values refused by check() in one line naming the option, before a model
is loaded; the command's options and Python keywords build the same object."""

from __future__ import annotations

import dataclasses

import pytest

from scca_eval.errors import UserError
from scca_eval.training.recipe import Recipe
from scca_eval.training.settings import TrainSettings


@pytest.mark.parametrize("values,fragment", [
    ({"ctx": 1}, "--ctx must be a whole number of at least 2"),
    ({"steps": 0}, "--steps must be a whole number of at least 1"),
    ({"lora_targets": "q_proj,bad name"}, "--lora-targets: 'bad name' is not a module name"),
    ({"trainable": "embed;norm"}, "--trainable: 'embed;norm' is not a module name"),
    ({"original_ctx": 0}, "--original-ctx must be a whole number of at least 1"),
    ({"dtype": "int8"}, "--dtype must be one of"),
    ({"attention_backend": "warp"}, "--attention-backend must be one of"),
    ({"pattern": "s3"}, "unknown pattern 's3'"),
    ({"pattern": "s2", "chunk_size": 128}, "above ctx 64"),
    ({"rope_scaling": "cubic:2"}, "--rope-scaling"),
    ({"eval_every": 5}, "--eval-every needs validation text"),
    ({"eval_every": 0, "eval_tasks": ["pg19_sample"]}, "--eval-every must be a whole number of steps"),
    ({"eval_tokens": 32, "eval_tasks": ["pg19_sample"]}, "--eval-tokens must be a whole number of at least one window"),
    ({"shard": True, "compile": True}, "--compile (and --cuda-graphs, which compiles) is not available with --shard"),
    ({"cuda_graphs": True}, "--cuda-graphs replays the compiled decoder layers: give --compile too"),
    ({"cuda_graphs": True, "compile": True, "gradient_checkpointing": True},
     "--cuda-graphs needs --no-gradient-checkpointing"),
    ({"cuda_graphs": True, "compile": True, "offload_activations": True},
     "--cuda-graphs keeps what the backward pass needs on the GPU: leave --offload-activations at auto or off"),
    ({"gradient_checkpointing": "sometimes"}, "--gradient-checkpointing must be True, False or \"auto\""),
    ({"cuda_graphs": 1}, "--cuda-graphs must be True, False or \"auto\""),
    ({"shard": True, "eval_tasks": ["pg19_sample"]}, "not measured under --shard"),
    ({"resume": True}, "--resume: "),
    ({"tasks": ["no_such_task"]}, "no_such_task"),
    ({"eval_data": ["no_such_folder"]}, "--eval-data no_such_folder: no such file or folder"),
])
def test_check_refuses_a_bad_value_in_one_line(values, fragment, sample_data_dir, tmp_path):
    settings = TrainSettings.from_options({"ctx": 64, "out": tmp_path / "run", "data": [str(sample_data_dir)],
                                           **values})
    with pytest.raises(UserError) as info:
        settings.check()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_recipe_for_another_ctx_is_refused(tmp_path):
    settings = TrainSettings(ctx=64, out=str(tmp_path / "run"), recipe=Recipe(ctx=128))
    with pytest.raises(UserError, match="the recipe is for ctx 128 but --ctx is 64"):
        settings.check()


def test_keywords_split_between_the_run_and_its_recipe(sample_data_dir, tmp_path):
    settings = TrainSettings.from_options({"ctx": 64, "out": tmp_path / "run", "data": [sample_data_dir],
                                           "pattern": "s2", "steps": 3, "lora_targets": "q_proj,v_proj",
                                           "trainable": "none", "max_time": 5.0, "eval_every": None})
    assert settings.recipe == Recipe(ctx=64, steps=3, lora_targets=("q_proj", "v_proj"), trainable=(),
                                     max_time=5.0)
    assert (settings.out, settings.data, settings.eval_every) == (str(tmp_path / "run"), (str(sample_data_dir),), None)
    settings.check()
    assert settings.pattern_spec.name == "s2"
    assert [task.name for task in settings.task_specs] == [sample_data_dir.name]
    assert settings.checkpoint_to_resume is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ctx = 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.recipe.steps = 10
    with pytest.raises(TypeError, match="unknown fine-tuning setting"):
        TrainSettings.from_options({"ctx": 64, "out": "run", "stpes": 3})


def test_the_command_and_python_keywords_build_equal_settings(monkeypatch, sample_data_dir, tmp_path):
    from click.testing import CliRunner

    import scca_eval.training as training
    from scca_eval.cli.finetune import finetune

    built = []

    def fake_finetune(model, settings, **options):
        built.append(settings)
        raise UserError("stop here")

    monkeypatch.setattr(training, "finetune", fake_finetune)
    out = tmp_path / "run"
    args = ["--ctx", "64", "--out", str(out), "--device", "cpu", "--data", str(sample_data_dir), "-p", "s2",
            "--steps", "3", "--lr", "1e-3", "--lora-targets", "q_proj,v_proj", "--trainable", "none",
            "--offload-activations", "off", "--max-time", "60", "--eval-data", str(sample_data_dir),
            "--eval-every", "2", "--keep-checkpoint", "--rope-scaling", "linear:2"]
    result = CliRunner().invoke(finetune, args)
    assert "stop here" in str(result.exception), result.output
    python = TrainSettings.from_options(dict(
        ctx=64, out=str(out), device="cpu", data=[str(sample_data_dir)], pattern="s2", steps=3, lr=1e-3,
        lora_targets=["q_proj", "v_proj"], trainable=[], offload_activations=False, max_time=60.0,
        eval_data=[str(sample_data_dir)], eval_every=2, keep_checkpoint=True, rope_scaling="linear:2"))
    assert built == [python]
    # and the defaults of both agree: the command's option defaults are the settings' own
    built.clear()
    CliRunner().invoke(finetune, ["--ctx", "64", "--out", str(out)])
    assert built == [TrainSettings(ctx=64, out=str(out))]


def test_finetune_takes_settings_or_keywords_not_both(tmp_path):
    from scca_eval.training import finetune

    settings = TrainSettings(ctx=64, out=str(tmp_path / "run"))
    with pytest.raises(TypeError, match="steps: give settings either"):
        finetune("default", settings, steps=3)
    with pytest.raises(TypeError, match="must be a TrainSettings"):
        finetune("default", {"ctx": 64})
