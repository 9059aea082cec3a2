"""EvalSettings: bad values refused by check() in one line naming the option; keywords build
the same object; a sweep predicts the identity of the record its settings then make."""

from __future__ import annotations

import dataclasses

import pytest

from scca_eval.errors import UserError
from scca_eval.evaluation.protocols import LmEvalProtocol, LongLoRAProtocol, StrideProtocol
from scca_eval.evaluation.settings import EvalSettings


@pytest.mark.parametrize("values,fragment", [
    ({"ctx": (1,)}, "--ctx must be whole numbers of at least 2"),
    ({"ctx": ()}, "--ctx: give at least one"),
    ({"ctx": (64,), "stride": 65}, "--stride must be between 1 and ctx (64)"),
    ({"stride": 0}, "--stride must be between 1"),
    ({"last_window": "long"}, "unknown --last-window 'long'"),
    ({"protocol": "lm-eval", "stride": 8}, "--stride does not apply to --protocol lm-eval"),
    ({"protocol": "lm-eval", "add_bos": True}, "--bos does not apply to --protocol lm-eval"),
    ({"protocol": "lm-eval", "last_window": "short"}, "--last-window short does not apply to --protocol lm-eval"),
    ({"protocol": "longlora", "last_window": "short"}, "--last-window short does not apply to --protocol longlora"),
    ({"protocol": "longlora", "stride": 0}, "LongLoRA window step) must be a whole number of at least 1"),
    ({"batch_size": 0}, "--batch-size must be a whole number of at least 1"),
    ({"max_tokens": 2.5}, "--max-tokens must be a whole number"),
    ({"save_every": -1}, "--save-every must be a whole number"),
    ({"seed": -1}, "--seed must be a whole number of at least 0"),
    ({"dtype": "int8"}, "--dtype must be one of"),
    ({"attention_backend": "warp"}, "--attention-backend must be one of"),
    ({"patterns": ("s3",)}, "unknown pattern"),
    ({"patterns": ()}, "--pattern: give at least one"),
    ({"patterns": ("s2",), "chunk_size": 65, "ctx": (64,)}, "--chunk-size"),
])
def test_check_refuses_a_bad_value_in_one_line(values, fragment, sample_data_dir):
    settings = EvalSettings(data=(str(sample_data_dir),), **values)
    with pytest.raises(UserError) as info:
        settings.check()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_protocol_is_refused_when_named():
    with pytest.raises(UserError, match="unknown protocol 'yarn'; choose one of stride, longlora, lm-eval"):
        EvalSettings(protocol="yarn")


def test_the_protocol_is_chosen_once_from_its_name():
    assert isinstance(EvalSettings().protocol, StrideProtocol)
    assert isinstance(EvalSettings(protocol="lm-eval").protocol, LmEvalProtocol)
    longlora = EvalSettings(protocol="longlora", ctx=128)
    assert isinstance(longlora.protocol, LongLoRAProtocol)
    # the stride each protocol's records carry
    assert longlora.protocol.cell_fields(longlora, 128).stride == 256  # LongLoRA's step, above ctx
    assert EvalSettings(stride=32).protocol.cell_fields(EvalSettings(stride=32), 64).stride == 32
    fields = EvalSettings(protocol="lm-eval").protocol.cell_fields(EvalSettings(protocol="lm-eval"), 64)
    assert (fields.stride, fields.last_window) == (64, "full")


def test_a_good_settings_object_passes_and_keywords_build_it(sample_data_dir):
    settings, rest = EvalSettings.from_options({"data": [str(sample_data_dir)], "ctx": 64, "pattern": "s2",
                                                "protocol": "longlora", "stride": 512, "adapter": None,
                                                "rope_scaling": "linear:2"})
    assert settings == EvalSettings(data=(str(sample_data_dir),), ctx=(64,), patterns=("s2",),
                                    protocol="longlora", stride=512)
    assert rest == {"adapter": None, "rope_scaling": "linear:2"}  # model-loading options stay out
    settings.check()  # LongLoRA's step may exceed ctx
    assert [spec.name for spec in settings.pattern_specs] == ["s2"]
    assert [task.name for task in settings.task_specs] == [sample_data_dir.name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.stride = 8


def _sweep_settings(model_dir, data_dir, out, **extra):
    return {"models": [str(model_dir)], "patterns": ["s2"], "ctx": [64], "data": [str(data_dir)],
            "max_tokens": 256, "device": "cpu", "out": str(out), **extra}


@pytest.mark.parametrize("protocol", ["lm-eval", "longlora"])
def test_a_sweep_predicts_the_identity_of_the_record_it_writes(protocol, tiny_model_dir, sample_data_dir, tmp_path):
    """Under a protocol other than the default, the identity the sweep looks for is the one
    of the record that evaluate() then writes from the same settings object: found when the
    sweep runs again, never computed twice."""
    from scca_eval.evaluation.cells import predicted_key
    from scca_eval.evaluation.sweep import config_key, make_sweep, run_sweep
    from scca_eval.data import tokenize_task
    from scca_eval.models import load_model, model_record
    from scca_eval.records import model_dtype, model_identity

    extra = {"protocol": protocol, **({"stride": 32} if protocol == "longlora" else {})}
    sweep = make_sweep(_sweep_settings(tiny_model_dir, sample_data_dir, tmp_path, **extra))
    (cell,) = sweep.cells
    assert cell.settings.protocol.name == protocol
    first = run_sweep(sweep)  # raises when a written record's identity is not the predicted one
    assert (first.computed, first.reused) == (1, 0)
    (record,) = first.records
    assert record["config"]["protocol"] == protocol

    lm, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    planned = predicted_key(cell.settings, model_part=model_identity(str(tiny_model_dir), model_record(lm, tokenizer)),
                            tokenized=tokenize_task(cell.task, tokenizer), spec=cell.spec, ctx=64,
                            dtype=model_dtype(lm))
    assert planned == config_key(record)
    # the default protocol's identity is another one: its record would not answer this cell
    stride_cell = make_sweep(_sweep_settings(tiny_model_dir, sample_data_dir, tmp_path)).cells[0]
    assert predicted_key(stride_cell.settings, model_part=model_identity(str(tiny_model_dir),
                                                                          model_record(lm, tokenizer)),
                         tokenized=tokenize_task(cell.task, tokenizer), spec=cell.spec, ctx=64,
                         dtype=model_dtype(lm)) != planned

    again = run_sweep(make_sweep(_sweep_settings(tiny_model_dir, sample_data_dir, tmp_path, **extra)))
    assert (again.computed, again.reused) == (0, 1)
