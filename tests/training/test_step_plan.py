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
    # a fixed chunk size: whole multiples of it
    assert probe_lengths(16384, chunk_size=128) == [256, 512, 1024]
    assert probe_lengths(16384, chunk_size=384) == [384, 768, 1152]
    assert probe_lengths(16384, chunk_size=1024) == [1024, 2048, 3072]
    assert probe_lengths(4096, chunk_size=2048) == [4096]


def test_saved_bytes_counts_each_storage_once_and_no_parameters_or_views_of_them():
    import weakref

    linear = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    outputs = []

    def forward():
        y = linear(x)  # frozen: saves only its weight, as a transposed view (not a Parameter)
        z = y.exp()  # saves its output z (4 x 8 floats)
        outputs.append(weakref.ref(z))
        return (z * z).sum() + (z * 2).sum()  # z again: one storage

    assert saved_bytes(forward) == 4 * 8 * 4 + linear.weight.nbytes  # the weight's view, unless told
    assert saved_bytes(forward, linear.parameters()) == 4 * 8 * 4
    assert all(output() is None for output in outputs)  # nothing the forward saved outlives the count


def _model(ctx, pattern=None, chunk_size=32):
    from scca_eval.attention import apply_pattern
    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.lora import attach_lora
    from scca_eval.training.loop import WindowLoss

    model = tiny_llama()
    if pattern is not None:
        apply_pattern(model, resolve_pattern(pattern, chunk_size=chunk_size))
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


def test_with_a_chunk_longer_than_ctx_over_16_the_probes_hold_whole_chunks():
    """s2 with G = 1024 at ctx 4096: probes of 64-256 tokens would each hold one partial chunk
    (and under-predict); whole chunks predict the whole window's count."""
    from scca_eval.training.step_plan import predict_activation_bytes

    loss = _model(4096, "s2", chunk_size=1024)
    predicted = predict_activation_bytes(loss, 4096, 1, torch.device("cpu"), None, chunk_size=1024)
    assert predicted["probe_lengths"] == [1024, 2048, 3072]
    actual = saved_bytes(lambda: loss(torch.zeros((1, 4096), dtype=torch.long)))
    assert 0.98 * actual <= predicted["bytes"] <= 1.05 * actual, (predicted, actual)


def test_the_probes_run_the_kernel_auto_chooses_at_ctx(monkeypatch):
    """Auto's backend is looked up at ctx during the probes, though their windows are shorter."""
    from scca_eval.attention import auto
    from scca_eval.training.step_plan import predict_activation_bytes

    looked_up = []
    decide = auto._decide

    def recording(spec, q, k, n, mode, entries):
        looked_up.append((q.shape[2], n, mode))
        return decide(spec, q, k, n, mode, entries)

    monkeypatch.setattr(auto, "_decide", recording)
    monkeypatch.setattr(auto, "_choices", {})
    predict_activation_bytes(_model(4096, "s2"), 4096, 1, torch.device("cpu"), None)
    # one lookup, by the first probe (64 tokens), for ctx; the longer probes reuse its answer
    assert looked_up == [(64, 4096, "fwd+bwd")]


def _never():
    raise AssertionError("auto probed where it had nothing to decide")


def test_off_a_cuda_gpu_auto_checkpoints_without_probing():
    plan = plan_step(Recipe(ctx=1024), torch.device("cpu"), single_process=True, predict=_never, trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.compile) == (True, False, False)
    assert plan.describe() == {"step": "eager, checkpointed", "reason": "not on a CUDA GPU"}


@pytest.mark.parametrize("asked, expected, reason", [
    ({"gradient_checkpointing": True}, (True, False, "auto"), "--gradient-checkpointing"),
    ({"cuda_graphs": False}, (True, False, "auto"), "--no-cuda-graphs"),
    ({"gradient_checkpointing": False, "cuda_graphs": False}, (False, False, "auto"), "as asked"),
    ({"offload_activations": True}, (True, False, True), "--offload-activations on"),
    ({"cuda_graphs": True, "compile": True}, (False, True, False), "--cuda-graphs"),
])
def test_what_is_asked_for_is_not_probed(asked, expected, reason):
    """An explicit choice (or offloading, which CUDA graphs cannot replay) leaves nothing to probe,
    and the plan names it; CUDA graphs asked for turn checkpointing and offloading off."""
    plan = plan_step(Recipe(ctx=1024, **asked), torch.device("cuda"), single_process=True, predict=_never,
                     trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.offload_activations) == expected
    assert plan.reason == reason


@pytest.fixture
def gpu_memory(monkeypatch):
    """A CUDA GPU as plan_step sees it, on any machine: allocated and at-hand bytes to set."""
    from scca_eval.training import step_plan

    memory = {"allocated": 2 * GIB, "reserved": 0, "free": 80 * GIB}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], 80 * GIB))
    monkeypatch.setattr(step_plan, "compiler_available", lambda device: True)
    return memory


def _predicting(gib):
    return lambda: {"bytes": int(gib * GIB), "probe_lengths": [16, 32, 64], "probe_bytes": [1, 2, 3]}


@pytest.mark.parametrize("asked", [{}, {"gradient_checkpointing": False}, {"compile": True}])
def test_auto_takes_cuda_graphs_where_the_prediction_fits(gpu_memory, asked):
    plan = plan_step(Recipe(ctx=16384, **asked), torch.device("cuda"), single_process=True, predict=_predicting(10),
                     trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.compile, chosen.offload_activations) == \
        (False, True, True, False)
    described = plan.describe()
    assert described["step"] == "CUDA graphs, no checkpointing" and described["need_gib"] == 12.0
    assert described["at_hand_gib"] == 80.0 and "every activation fits" in described["reason"]


@pytest.mark.parametrize("asked, checkpointing", [({}, True), ({"gradient_checkpointing": False}, False)])
def test_auto_keeps_to_the_asked_or_checkpointed_step_where_it_does_not_fit(gpu_memory, asked, checkpointing):
    gpu_memory["free"] = 20 * GIB  # 12 GiB needed, more than half of 20
    plan = plan_step(Recipe(ctx=16384, **asked), torch.device("cuda"), single_process=True, predict=_predicting(10),
                     trainable=[])
    chosen = plan.recipe
    assert (chosen.gradient_checkpointing, chosen.cuda_graphs, chosen.compile) == (checkpointing, False, False)
    assert plan.describe()["step"] == ("eager, checkpointed" if checkpointing else "eager, no checkpointing")
    assert "more than 50% of 20.0 GiB at hand" in plan.reason


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_a_probe_out_of_memory_means_the_checkpointed_step(gpu_memory, monkeypatch, error):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory():
        raise error

    plan = plan_step(Recipe(ctx=16384), torch.device("cuda"), single_process=True, predict=out_of_memory,
                     trainable=[])
    assert plan.recipe.gradient_checkpointing is True and plan.recipe.cuda_graphs is False
    assert plan.reason == "a probe window ran out of GPU memory" and emptied == [True]


def test_plan_for_model_probes_with_the_pattern_s_fixed_chunk_size(gpu_memory, monkeypatch):
    from scca_eval.training import step_plan

    asked = []

    def predict(window_loss, ctx, batch_size, device, autocast_dtype, chunk_size=None):
        asked.append((ctx, batch_size, chunk_size))
        return _predicting(1)()

    monkeypatch.setattr(step_plan, "predict_activation_bytes", predict)
    for chunk_size, pattern in ((1024, "s2"), (None, "s2"), (None, None)):
        peft_model = _model(4096, pattern, chunk_size=chunk_size).model
        step_plan.plan_for_model(Recipe(ctx=4096, batch_size=2), peft_model, torch.device("cuda"), None)
    assert asked == [(4096, 2, 1024), (4096, 2, None), (4096, 2, None)]


def test_a_probe_error_that_is_not_out_of_memory_is_raised(gpu_memory):
    def broken():
        raise RuntimeError("shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        plan_step(Recipe(ctx=16384), torch.device("cuda"), single_process=True, predict=broken, trainable=[])


def test_a_forward_that_runs_out_of_memory_leaves_nothing_it_saved_alive():
    """The saved tensors hold the counting hook, which holds them: saved_bytes breaks that cycle
    even where the forward raised (else a failed probe's activations would stay on the GPU)."""
    import weakref

    x = torch.randn(4, 8, requires_grad=True)
    outputs = []

    def forward():
        y = x.exp()  # saves its output
        outputs.append(weakref.ref(y))
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        saved_bytes(forward)
    assert outputs and outputs[0]() is None


def test_without_a_gpu_compiler_auto_does_not_probe(gpu_memory, monkeypatch):
    from scca_eval.training import step_plan

    monkeypatch.setattr(step_plan, "compiler_available", lambda device: False)
    plan = plan_step(Recipe(ctx=16384), torch.device("cuda"), single_process=True, predict=_never, trainable=[])
    assert plan.recipe.gradient_checkpointing is True and "Triton" in plan.reason


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


@pytest.mark.parametrize("checkpointing, predicted, advice", [
    (False, True, "that auto predicted would fit: give --gradient-checkpointing"),
    (False, False, "give --gradient-checkpointing (instead of --no-gradient-checkpointing or --cuda-graphs)"),
    (True, False, "give a smaller --batch-size"),
])
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")])
def test_an_out_of_memory_step_says_what_to_change(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch,
                                                   checkpointing, predicted, advice, error):
    """Out of memory in a step, as one line: auto's prediction is blamed only where auto took the
    step without checkpointing, an asked-for step without checkpointing is named as such."""
    from scca_eval import finetune
    from scca_eval.errors import UserError
    from scca_eval.training import run, step_plan
    from scca_eval.training.loop import Trainer

    def plan(recipe, *args, **kwargs):
        import dataclasses

        chosen = dataclasses.replace(recipe, gradient_checkpointing=checkpointing, cuda_graphs=False)
        return step_plan.StepPlan(chosen, "every activation fits" if predicted else "as asked",
                                  {"bytes": 1, "fits": True} if predicted else None)

    def out_of_memory(self):
        raise error

    monkeypatch.setattr(run, "plan_for_model", plan)
    monkeypatch.setattr(Trainer, "step", out_of_memory)
    with pytest.raises(UserError) as raised:
        finetune(str(tiny_model_dir), ctx=64, out=tmp_path / "run", data=[str(sample_data_dir)], steps=1,
                 grad_accum=1, warmup_steps=0, device="cpu", notify=lambda message: None)
    assert advice in str(raised.value) and "\n" not in str(raised.value)


def test_a_step_error_that_is_not_out_of_memory_is_raised(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    from scca_eval import finetune
    from scca_eval.training.loop import Trainer

    def broken(self):
        raise RuntimeError("shapes cannot be multiplied")

    monkeypatch.setattr(Trainer, "step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        finetune(str(tiny_model_dir), ctx=64, out=tmp_path / "run", data=[str(sample_data_dir)], steps=1,
                 grad_accum=1, warmup_steps=0, device="cpu", notify=lambda message: None)


def test_bench_train_records_the_step_it_timed():
    from scca_eval.bench.train import markdown_train, train_bench

    result = train_bench("smollm2-135m", (64,), ("full",), device=torch.device("cpu"), steps=1, warmup=0,
                         baseline=False, layers=1, log=None)
    assert result["step"] == {"step": "eager, checkpointed", "reason": "not on a CUDA GPU"}
    assert result["gradient_checkpointing"] is True and result["cuda_graphs"] is False
    assert "auto's step: not on a CUDA GPU" in markdown_train(result)


@pytest.mark.gpu
def test_gpu_auto_takes_cuda_graphs_where_activations_fit_and_checkpoints_where_they_do_not(
        tiny_model_dir, sample_data_dir, tmp_path):
    """On a GPU with room, auto trains compiled layers as CUDA graphs without checkpointing, the
    losses those settings give when asked for (with LoRA dropout on, so that probes which drew
    from the GPU's random state would change them); under a tiny --max-memory it checkpoints."""
    from scca_eval import finetune

    common = dict(ctx=256, data=[str(sample_data_dir)], pattern="s2", steps=3, grad_accum=2, warmup_steps=0,
                  lr=1e-3, lora_dropout=0.1, device="cuda", dtype="float32", notify=lambda message: None)
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
def test_gpu_prediction_matches_the_memory_a_whole_window_holds():
    """On a GPU, set up as finetune trains (bf16 frozen weights, float32 trained ones, bf16
    autocast, activations kept in bf16; full attention, the packed and flex kernels, each checked
    to have run), the probes' prediction at ctx is within a tenth below and a quarter above the
    memory a forward over the whole window holds for its backward pass (allocated after it, less
    allocated before)."""
    from scca_eval.attention import apply_pattern, call_counts, reset_call_counts
    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.lora import attach_lora, keep_activations_in
    from scca_eval.training.loop import WindowLoss
    from scca_eval.training.step_plan import predict_activation_bytes

    ctx = 8192
    # (full attention keeps transformers' own SDPA: no call of this project's kernels to count)
    for pattern, backend, kernel in (("full", "auto", None), ("s2", "packed", "packed"),
                                     ("longmixed", "flex", "flex")):
        model = tiny_llama().to("cuda", torch.bfloat16)
        apply_pattern(model, resolve_pattern(pattern), backend=backend)
        peft_model = attach_lora(model, Recipe(ctx=ctx, batch_size=1, grad_accum=1, warmup_steps=0), "tiny")
        keep_activations_in(peft_model, torch.bfloat16)
        loss = WindowLoss(peft_model, 1024)
        predicted = predict_activation_bytes(loss, ctx, 1, torch.device("cuda"), torch.bfloat16)
        ids = torch.zeros((1, ctx), dtype=torch.long, device="cuda")
        torch.cuda.synchronize()
        reset_call_counts()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll = loss(ids)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        assert set(call_counts()) == ({kernel} if kernel else set()), (pattern, call_counts())
        del nll
        assert 0.9 * held <= predicted["bytes"] <= 1.25 * held, (pattern, predicted, held)
