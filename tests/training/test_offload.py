"""--offload-activations auto (training/offload.py): its arithmetic, its settings, and on a GPU
that what it measures bounds what keeping the activations really takes.

GPU tests: ``python -m pytest -q -m gpu tests/training/test_offload.py``.
"""

from __future__ import annotations

import pytest
import torch

from scca_eval.errors import UserError
from scca_eval.training.offload import GIB, ActivationPlace, adam_state_bytes, decide
from scca_eval.training.recipe import Recipe


def test_decision_arithmetic():
    # a pass that peaked at 16 GiB reserved (15 GiB allocated) and saved 2 GiB, before the
    # first optimizer step (1 GiB of AdamW state to come): keeping needs 16 + 3 * 16/15 GiB
    measured = decide(saved=2 * GIB, peak_reserved=16 * GIB, peak_allocated=15 * GIB, state_to_come=GIB,
                      reserved_now=14 * GIB, free=60 * GIB, max_memory=None)
    assert measured.need == int(16 * GIB + 3 * GIB * 16 / 15)
    assert measured.at_hand == 74 * GIB and not measured.offload
    capped = decide(2 * GIB, 16 * GIB, 15 * GIB, GIB, 14 * GIB, 60 * GIB, max_memory=19 * GIB)
    assert capped.at_hand == 19 * GIB and capped.offload  # 19.2 GiB needed
    tight = decide(2 * GIB, 16 * GIB, 15 * GIB, 0, 16 * GIB, 2 * GIB, max_memory=None)
    assert tight.need == int(16 * GIB + 2 * GIB * 16 / 15) and tight.offload  # 18.13 > 18
    assert "offloading" in tight.describe() and "keeping" in measured.describe()
    assert measured.to_dict()["need_if_kept_gib"] == round(measured.need / GIB, 3)


def test_adam_state_is_two_moments_of_each_trained_parameter():
    parameters = [torch.nn.Parameter(torch.zeros(10, 4)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    assert adam_state_bytes(parameters) == 2 * (40 * 4 + 3 * 8)
    optimizer = torch.optim.AdamW(parameters)
    sum(p.sum() for p in parameters).backward()
    optimizer.step()
    held = sum(t.nbytes for state in optimizer.state.values() for name, t in state.items() if name != "step")
    assert held == adam_state_bytes(parameters)  # what AdamW really allocates


def test_off_a_gpu_nothing_is_offloaded_or_measured():
    place = ActivationPlace("auto", torch.device("cpu"))
    assert place.offloading() is False
    with place.forward():
        pass
    place.after_pass([], optimizer_has_state=False)
    assert place.measurement is None and place.describe() == {"setting": "auto", "offloaded": False}
    assert ActivationPlace(True, torch.device("cpu")).describe() == {"setting": "on", "offloaded": False}


def test_on_a_gpu_the_fixed_settings_need_no_measurement():
    assert ActivationPlace(True, torch.device("cuda", 0)).offloading() is True
    assert ActivationPlace(False, torch.device("cuda", 0)).offloading() is False
    assert ActivationPlace("auto", torch.device("cuda", 0)).offloading() is None  # measured in the first pass


@pytest.mark.parametrize("options,message", [
    ({"offload_activations": "sometimes"}, "--offload-activations must be auto, on or off"),
    ({"max_memory_gib": 0}, "--max-memory must be a number of GiB above 0"),
    ({"max_memory_gib": float("nan")}, "--max-memory"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        Recipe(ctx=64, **options).check()


def test_the_setting_stays_out_of_the_resume_key():
    from scca_eval.training.checkpoint import run_key

    def key(**options):
        return run_key(model={"id": "m"}, pattern={}, rope_scaling=None, ctx=64, data="d",
                       recipe=Recipe(ctx=64, **options).to_dict(), dtype="float32")

    assert key() == key(offload_activations=True, max_memory_gib=20.0) == key(offload_activations=False)
    assert Recipe(ctx=64).offload_activations == "auto"


def test_cli_reads_the_setting(monkeypatch, tmp_path):
    """finetune's --offload-activations auto|on|off (bare: on), the old --no-offload-activations, --max-memory."""
    from click.testing import CliRunner

    import scca_eval.training as training
    from scca_eval.cli.finetune import finetune

    seen = {}

    def fake_finetune(model, settings, **options):
        seen.update(offload_activations=settings.recipe.offload_activations,
                    max_memory_gib=settings.recipe.max_memory_gib)
        raise UserError("stop here")

    monkeypatch.setattr(training, "finetune", fake_finetune)
    common = ["--ctx", "64", "--out", str(tmp_path / "out"), "--device", "cpu"]
    for args, expected in ([], "auto"), (["--offload-activations"], True), (["--offload-activations", "off"], False), \
            (["--no-offload-activations"], False), (["--offload-activations", "auto", "--max-memory", "12.5"], "auto"):
        seen.clear()
        result = CliRunner().invoke(finetune, [*common, *args])
        assert "stop here" in str(result.exception) or "stop here" in result.output, result.output
        assert seen["offload_activations"] == expected, args
    assert seen["max_memory_gib"] == 12.5


# -- GPU (skipped without one) -------------------------------------------------------------------
def _trainer(offload, max_memory_gib=None, layers=6, hidden=256, ctx=1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing
    from scca_eval.training.loop import Trainer
    from scca_eval.training.windows import TrainingStream

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx)
    model = LlamaForCausalLM(config).cuda()
    recipe = Recipe(ctx=ctx, batch_size=2, grad_accum=2, warmup_steps=0, offload_activations=offload,
                    max_memory_gib=max_memory_gib)
    peft_model = attach_lora(model, recipe, "tiny")
    enable_gradient_checkpointing(peft_model)
    tokens = torch.randint(0, 320, (ctx * 16,), generator=torch.Generator().manual_seed(0)).numpy()
    stream = TrainingStream(tokens, ctx, None, [], "random")
    return Trainer(peft_model, stream, recipe, torch.device("cuda"), None), config


@pytest.mark.gpu
def test_gpu_auto_measures_what_keeping_takes():
    """auto's first pass counts at least every layer's saved input (computed from the shape), and
    what it says keeping needs bounds the memory a kept pass really reserves."""
    from scca_eval.training.loop import window_nll_sum

    trainer, config = _trainer("auto")
    trainer.step()  # pass 1 measured (offloaded), pass 2 as decided
    measured = trainer.activations.measurement
    assert measured is not None and not measured.offload  # a small model: keeping fits
    layer_inputs = config.num_hidden_layers * 2 * 1024 * config.hidden_size * 4  # batch 2, float32
    assert measured.saved >= layer_inputs
    assert trainer.activations.describe()["offloaded"] is False

    ids = torch.randint(0, 320, (2, 1024), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with trainer.activations.forward():  # kept now
        nll = window_nll_sum(trainer.model, ids)
    nll.backward()
    kept_peak = torch.cuda.max_memory_reserved()
    assert kept_peak <= measured.need, (kept_peak / GIB, measured.need / GIB)


@pytest.mark.gpu
def test_gpu_auto_offloads_under_a_small_max_memory_and_trains_the_same():
    kept, _ = _trainer("auto")
    offloaded, _ = _trainer("auto", max_memory_gib=0.01)
    for trainer in (kept, offloaded):
        trainer.step()
        trainer.step()
    assert kept.activations.measurement.offload is False and offloaded.activations.measurement.offload is True
    assert offloaded.activations.describe()["max_memory_gib"] == 0.01
    for a, b in zip(kept.parameters, offloaded.parameters):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_host_offload_keeps_each_tensors_layout():
    """A saved tensor comes back from the host with its strides (a compiled backward checks
    them); a broadcast view, whose layout a copy cannot keep, and a parameter stay on the GPU."""
    from scca_eval.training.offload import HostOffload

    hooks = HostOffload()
    transposed = torch.randn(1, 16, 3, 8, device="cuda").transpose(1, 2)
    device, packed = hooks._pack(transposed)
    assert packed.device.type == "cpu" and packed.is_pinned() and packed.stride() == transposed.stride()
    back = hooks._unpack((device, packed))
    torch.cuda.synchronize()
    assert back.is_cuda and back.stride() == transposed.stride() and torch.equal(back, transposed)
    assert hooks.saved_bytes == transposed.nbytes
    broadcast = torch.randn(8, 1, device="cuda").expand(8, 4)
    parameter = torch.nn.Parameter(torch.randn(4, device="cuda"))
    for kept in (broadcast, parameter):
        device, same = hooks._pack(kept)
        assert device is None and same is kept and hooks._unpack((device, same)) is kept
    assert hooks.saved_bytes == transposed.nbytes
