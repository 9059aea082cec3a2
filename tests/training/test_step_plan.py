"""auto's step (training/step_plan.py): the memory prediction from short probes, the decision,
and what finetune and bench train record of it. GPU tests: ``python -m pytest -q -m gpu
tests/training/test_step_plan.py``."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_llama
from scca_eval.training.offload import GIB
from scca_eval.training.recipe import Recipe
from scca_eval.training.step_plan import (FAST_STEP_SHARE, extrapolate, fast_step_verdict, plan_step, probe_lengths,
                                          saved_bytes)


def test_extrapolation_is_exact_for_a_quadratic_and_never_below_the_line():
    lengths = [64, 128, 256]
    quadratic = [int(1000 + 7 * n + 0.5 * n * n) for n in lengths]
    assert extrapolate(lengths, quadratic, 4096) == int(1000 + 7 * 4096 + 0.5 * 4096 ** 2)
    # bending down: the line through the last two points is the higher (safer) answer
    concave = [1000, 1800, 3000]
    assert extrapolate(lengths, concave, 4096) == int(3000 + (3000 - 1800) * (4096 - 256) / 128)
    assert extrapolate([32], [555], 32) == 555


def test_probe_lengths_are_fractions_of_ctx_or_ctx_itself():
    assert probe_lengths(16384) == [256, 512, 1024]
    assert probe_lengths(64) == [64]  # too short for three probes of at least two tokens


def test_saved_bytes_counts_each_storage_once_and_no_parameters():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)

    def forward():
        y = x @ weight  # saves x (16 floats x 8) and the parameter (left out)
        return (y * y).sum() + (y * 2).sum()  # saves y once (twice over, one storage)

    assert saved_bytes(forward) == x.nbytes + 4 * 8 * 4


def _model(ctx, pattern=None):
    from scca_eval.attention import apply_pattern
    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.lora import attach_lora
    from scca_eval.training.loop import WindowLoss

    model = tiny_llama()
    if pattern is not None:
        apply_pattern(model, resolve_pattern(pattern, chunk_size=32))
    peft_model = attach_lora(model, Recipe(ctx=ctx, batch_size=1, grad_accum=1, warmup_steps=0), "tiny")
    peft_model.train()
    return WindowLoss(peft_model, 256)


@pytest.mark.parametrize("pattern", [None, "s2", "longmixed"])
def test_the_probes_predict_what_a_whole_window_saves(pattern):
    """Probes at ctx/64..ctx/16 predict the bytes a forward at ctx keeps for its backward, counted
    independently on the whole window; they train nothing and leave the random state alone."""
    from scca_eval.training.step_plan import predict_activation_bytes

    ctx = 4096
    loss = _model(ctx, pattern)
    before = [p.detach().clone() for p in loss.parameters()]
    state = torch.random.get_rng_state()
    predicted = predict_activation_bytes(loss, ctx, 1, torch.device("cpu"), None)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in loss.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, loss.parameters()))
    assert predicted["probe_lengths"] == [64, 128, 256]
    ids = torch.zeros((1, ctx), dtype=torch.long)
    actual = saved_bytes(lambda: loss(ids))
    assert 0.9 * actual <= predicted["bytes"] <= 1.25 * actual, (predicted, actual)


def _never():
    raise AssertionError("auto probed where it had nothing to decide")


def test_off_a_cuda_gpu_auto_checkpoints_without_probing():
    plan = plan_step(Recipe(ctx=1024), torch.device("cpu"), single_process=True, predict=_never, trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.compile) == (True, False, False)
    assert plan.describe() == {"step": "eager, checkpointed", "reason": "not on a CUDA GPU"}


@pytest.mark.parametrize("asked, expected", [
    ({"gradient_checkpointing": True}, (True, False, "auto")),
    ({"gradient_checkpointing": False, "cuda_graphs": False}, (False, False, "auto")),
    ({"offload_activations": True}, (True, False, True)),
    ({"cuda_graphs": True, "compile": True}, (False, True, False)),
])
def test_what_is_asked_for_is_not_probed(asked, expected):
    """An explicit choice (or offloading, which CUDA graphs cannot replay) leaves nothing to probe;
    CUDA graphs asked for turn checkpointing and offloading off."""
    plan = plan_step(Recipe(ctx=1024, **asked), torch.device("cuda"), single_process=True, predict=_never,
                     trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.offload_activations) == expected


def test_several_processes_checkpoint():
    plan = plan_step(Recipe(ctx=1024), torch.device("cuda"), single_process=False, predict=_never, trainable=[])
    assert plan.recipe.gradient_checkpointing is True and plan.recipe.cuda_graphs is False
    assert plan.reason == "several processes"


def test_the_verdict_adds_weights_activations_gradients_and_adam_and_keeps_half_the_memory():
    trainable = [torch.nn.Parameter(torch.zeros(GIB // 16))]  # 0.25 GiB of float32: as much again for its gradient
    prediction = {"bytes": 3 * GIB, "probe_lengths": [1, 2, 3], "probe_bytes": [1, 2, 3]}
    need = 2 * GIB + 3 * GIB + GIB // 4 + GIB // 2  # allocated, activations, gradient, two moments
    fits = fast_step_verdict(prediction, allocated=2 * GIB, trainable=trainable, at_hand=int(need / FAST_STEP_SHARE),
                             max_memory_gib=None)
    assert fits["fits"] and fits["need_bytes"] == need
    assert not fast_step_verdict(prediction, allocated=2 * GIB, trainable=trainable,
                                 at_hand=int(need / FAST_STEP_SHARE) - 1, max_memory_gib=None)["fits"]
    limited = fast_step_verdict(prediction, allocated=2 * GIB, trainable=trainable, at_hand=80 * GIB, max_memory_gib=8)
    assert not limited["fits"] and limited["at_hand_bytes"] == 8 * GIB
    assert "more than 50% of 8.0 GiB at hand" in limited["reason"]


def test_finetune_records_the_step_it_took(tiny_model_dir, sample_data_dir, tmp_path):
    from scca_eval import finetune

    record = finetune(str(tiny_model_dir), ctx=64, out=tmp_path / "run", data=[str(sample_data_dir)], steps=1,
                      grad_accum=1, warmup_steps=0, device="cpu", notify=lambda message: None)
    assert record["runtime"]["step"] == {"step": "eager, checkpointed", "reason": "not on a CUDA GPU"}
    assert record["recipe"]["gradient_checkpointing"] is True and record["recipe"]["cuda_graphs"] is False
    written = json.loads((tmp_path / "run" / "training.json").read_text())
    assert written["runtime"]["step"] == record["runtime"]["step"]


@pytest.mark.gpu
def test_gpu_auto_takes_cuda_graphs_where_activations_fit_and_checkpoints_where_they_do_not(
        tiny_model_dir, sample_data_dir, tmp_path):
    """On a GPU with room, auto trains compiled layers as CUDA graphs without checkpointing, the
    losses those settings give when asked for; under a tiny --max-memory it checkpoints."""
    from scca_eval import finetune

    common = dict(ctx=256, data=[str(sample_data_dir)], pattern="s2", steps=3, grad_accum=2, warmup_steps=0,
                  lr=1e-3, device="cuda", dtype="float32", notify=lambda message: None)
    auto = finetune(str(tiny_model_dir), out=tmp_path / "auto", **common)
    assert auto["runtime"]["step"]["step"] == "CUDA graphs, no checkpointing", auto["runtime"]["step"]
    assert auto["recipe"]["cuda_graphs"] is True and auto["recipe"]["gradient_checkpointing"] is False
    assert auto["runtime"]["step"]["probe_lengths"] == [4, 8, 16]
    asked = finetune(str(tiny_model_dir), out=tmp_path / "asked", compile=True, cuda_graphs=True,
                     gradient_checkpointing=False, offload_activations=False, **common)
    torch.testing.assert_close(auto["loss_curve"], asked["loss_curve"], rtol=1e-4, atol=1e-4)
    small = finetune(str(tiny_model_dir), out=tmp_path / "small", max_memory_gib=0.001, **common)
    assert small["runtime"]["step"]["step"] == "eager, checkpointed", small["runtime"]["step"]
    assert "more than 50%" in small["runtime"]["step"]["reason"]


@pytest.mark.gpu
def test_gpu_prediction_bounds_a_kept_pass():
    """On a GPU (bf16 autocast, the packed and flex kernels), the probes' prediction at ctx is
    within a quarter of what a whole window keeps for its backward, and is not below it by more
    than a tenth."""
    from scca_eval.attention import apply_pattern
    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.lora import attach_lora
    from scca_eval.training.loop import WindowLoss
    from scca_eval.training.step_plan import predict_activation_bytes

    ctx = 4096
    for pattern, backend in (("full", "auto"), ("s2", "packed"), ("longmixed", "flex")):
        model = tiny_llama().cuda()
        apply_pattern(model, resolve_pattern(pattern), backend=backend)
        peft_model = attach_lora(model, Recipe(ctx=ctx, batch_size=1, grad_accum=1, warmup_steps=0), "tiny")
        peft_model.train()
        loss = WindowLoss(peft_model, 1024)
        predicted = predict_activation_bytes(loss, ctx, 1, torch.device("cuda"), torch.bfloat16)
        ids = torch.zeros((1, ctx), dtype=torch.long, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            actual = saved_bytes(lambda: loss(ids))
        assert 0.9 * actual <= predicted["bytes"] <= 1.25 * actual, (pattern, predicted, actual)
