"""Fine-tuning with compiled layers (finetune --compile): the trainer's first pass runs
eagerly, so that attention layouts are built before anything is traced and the layers
compile into whole graphs (training/loop.py); which modules count as compiled (training/lora.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import masked_varlen, tiny_llama
from scca_eval.training.lora import attach_lora, has_compiled_layers
from scca_eval.training.loop import Trainer
from scca_eval.training.recipe import Recipe
from scca_eval.training.windows import TrainingStream


def _trainer(compiled: bool, ctx: int = 32, pattern: str | None = None):
    from scca_eval.attention import apply_pattern
    from scca_eval.patterns import resolve_pattern

    model = tiny_llama()
    if pattern is not None:
        apply_pattern(model, resolve_pattern(pattern, chunk_size=8), backend="packed")
    recipe = Recipe(ctx=ctx, batch_size=1, grad_accum=2, warmup_steps=0)
    peft_model = attach_lora(model, recipe, "tiny")
    if compiled:
        for layer in peft_model.get_base_model().get_decoder().layers:
            layer.compile(dynamic=False)  # lazy: nothing is compiled before a call
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, ctx * 8).astype(np.int64)
    return Trainer(peft_model, TrainingStream(tokens, ctx, None, [], "random"), recipe, torch.device("cpu"), None)


def test_compiled_layers_are_recognised():
    model = tiny_llama()
    assert not has_compiled_layers(model)
    model.model.layers[1].compile()
    assert has_compiled_layers(model)


def test_compile_layers_takes_a_plain_or_a_peft_model_and_raises_the_recompile_limit():
    """finetune compiles a peft model, bench train the plain one it attaches LoRA to per cell;
    both raise dynamo's recompile limit, past which layers would silently run eagerly (a bench
    of many patterns and backends in one process compiles a graph for each)."""
    from scca_eval.training.lora import compile_layers

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    try:
        for wrap in (False, True):
            setattr(config, name, 8)
            model = tiny_llama()
            target = attach_lora(model, Recipe(ctx=32, batch_size=1, grad_accum=1, warmup_steps=0), "tiny") \
                if wrap else model
            compile_layers(target)  # lazy: nothing is compiled before a call
            assert getattr(config, name) >= 64
            assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.model.layers)
    finally:
        setattr(config, name, before)


def _fresh_compiled_trainer(monkeypatch):
    """A trainer of compiled layers under longmixed on the packed backend, with nothing
    compiled or cached yet and dynamo's counters at zero."""
    from torch._dynamo.utils import counters

    from scca_eval.attention import packed, packing

    # the varlen contract as one traceable SDPA call, so that the CPU run compiles as a GPU run does
    monkeypatch.setattr(packed, "segment_attention", masked_varlen)
    packing._plans.clear()  # layouts built by earlier tests would hide the first pass's lookups
    torch._dynamo.reset()
    counters.clear()
    return _trainer(compiled=True, pattern="longmixed")


def _compiled_steps(monkeypatch, eager_first_pass: bool, steps: int = 3) -> tuple[int, list[int]]:
    """Graph breaks over ``steps`` fine-tuning steps of compiled layers under a packed
    pattern, and the graphs compiled so far after each step."""
    from torch._dynamo.utils import counters

    trainer = _fresh_compiled_trainer(monkeypatch)
    if not eager_first_pass:
        trainer._eager_passes = 0
    graphs = []
    for _ in range(steps):
        trainer.step()
        graphs.append(counters["stats"].get("unique_graphs", 0))
    return sum(counters["graph_break"].values()), graphs


def test_compiled_layers_train_in_whole_graphs(monkeypatch):
    """The first pass runs eagerly, so the layers under a packed pattern find their layout
    built and compile without a graph break, once (nothing they read changes from step to
    step); without that pass, each traced layer keeps a break (the layout is built outside
    the graph) in every step."""
    breaks, graphs = _compiled_steps(monkeypatch, eager_first_pass=True)
    assert breaks == 0
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 2  # compiled in the first step's second pass
    breaks, _ = _compiled_steps(monkeypatch, eager_first_pass=False)
    assert breaks > 0


def test_checkpointed_layers_compile_too(monkeypatch):
    """Under gradient checkpointing (finetune's step where activations would not fit) the compiled layers compile into
    graphs without a graph break (a side effect inside the checkpointed forward would make
    them run eagerly without a word) and train the same losses as the eager layers."""
    from torch._dynamo.utils import counters

    from scca_eval.training.lora import compile_layers, enable_gradient_checkpointing

    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        trainer = _trainer(compiled=False)
        enable_gradient_checkpointing(trainer.model)
        if compiled:
            compile_layers(trainer.model)
            trainer._eager_passes = 1  # as a trainer built around compiled layers does
        losses[compiled] = [trainer.step()["loss"] for _ in range(3)]
        if compiled:
            assert counters["stats"].get("unique_graphs", 0) > 0
            assert sum(counters["graph_break"].values()) == 0
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("backend", ["strided", "chunked"])
def test_view_and_chunk_backends_train_compiled_in_whole_graphs(backend):
    """strided and chunked hand the incoming gradient on in the output's layout (a hook that
    branches on its strides, eagerly; a traceable copy when compiled) and read the pattern's
    chunk and head groups from a cache: compiled layers train without a graph break, in one
    shared graph, and the same losses as eager layers."""
    from torch._dynamo.utils import counters

    from scca_eval.attention import apply_pattern
    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.lora import compile_layers

    losses = {}
    for compiled in (False, True):
        model = tiny_llama()
        apply_pattern(model, resolve_pattern("longmixed"), backend=backend)  # the default chunk: a share of ctx
        recipe = Recipe(ctx=64, batch_size=1, grad_accum=1, warmup_steps=0, gradient_checkpointing=False)
        peft_model = attach_lora(model, recipe, "tiny")
        if compiled:
            compile_layers(peft_model)
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 64 * 8).astype(np.int64)
        trainer = Trainer(peft_model, TrainingStream(tokens, 64, None, [], "random"), recipe, torch.device("cpu"),
                          None)
        torch._dynamo.reset()
        counters.clear()
        losses[compiled] = [trainer.step()["loss"] for _ in range(3)]
        if compiled:
            assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
            assert counters["stats"].get("unique_graphs", 0) == 1
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_layers_share_one_graph_and_validation_does_not_recompile_them(monkeypatch):
    """The layers of a model under a pattern read one spec object, so they share one compiled
    graph (a graph per layer would pass dynamo's recompile limit on a deep model and leave the
    rest of the layers eager). Validation switches the model to full attention and back
    (validation_loss.full_attention); coming back must hand the layers the objects they were
    traced with, so the training graph is reused: one graph for training and one for
    validation (no gradients), however often a run validates."""
    from torch._dynamo.utils import counters

    from scca_eval.patterns import resolve_pattern
    from scca_eval.training.loop import window_nll_sum
    from scca_eval.training.validation_loss import full_attention

    trainer = _fresh_compiled_trainer(monkeypatch)
    assert len(trainer.model.get_base_model().get_decoder().layers) > 1
    spec = resolve_pattern("longmixed", chunk_size=8)
    ids = torch.randint(0, trainer.model.config.vocab_size, (1, 32))
    graphs = []
    for _ in range(4):
        trainer.step()
        graphs.append(counters["stats"].get("unique_graphs", 0))
        trainer.model.eval()
        with torch.no_grad(), full_attention(trainer.model, spec, "packed"):
            window_nll_sum(trainer.model, ids)
        trainer.model.train()
        graphs.append(counters["stats"].get("unique_graphs", 0))
    assert sum(counters["graph_break"].values()) == 0
    assert graphs == [1] + [2] * 7, graphs


def test_cuda_graphs_imply_compile_and_need_a_gpu(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """finetune --cuda-graphs: compiled layers follow from it; without a GPU it is refused in one
    line (exit 2) before anything is trained, and nothing is written."""
    from unittest import mock

    from helpers import run_cli

    import scca_eval.training as training
    from scca_eval.errors import UserError

    common = ["finetune", "--model", str(tiny_model_dir), "--ctx", "64", "--data", str(sample_data_dir),
              "--cuda-graphs", "--no-gradient-checkpointing", "--offload-activations", "off"]
    seen = {}

    def fake_finetune(model, settings, **options):
        seen.update(compile=settings.recipe.compile, cuda_graphs=settings.recipe.cuda_graphs)
        raise UserError("stop here")

    with mock.patch.object(training, "finetune", fake_finetune):
        code, out, err = run_cli([*common, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and seen == {"compile": True, "cuda_graphs": True}, err
    if torch.cuda.is_available():
        return
    code, out, err = run_cli([*common, "--device", "cpu", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and err.strip() == "scca-eval: error: --cuda-graphs needs a CUDA GPU; train without it here", err
    assert not (tmp_path / "b").exists()
    code, out, err = run_cli(["bench", "train", "--shape", "smollm2-135m", "--ctx", "64", "--layers", "1",
                              "--device", "cpu", "--cuda-graphs"], capsys)
    assert code == 2 and "--cuda-graphs needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.gpu
def test_cuda_graphs_train_the_same_steps(tiny_model_dir, sample_data_dir, tmp_path):
    """On a GPU, --cuda-graphs gives the training and validation losses of compiled layers
    without graphs (the same kernels, replayed)."""
    import json

    from scca_eval import finetune

    runs = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs-{graphs}"
        finetune(str(tiny_model_dir), ctx=64, out=out, data=[str(sample_data_dir)], pattern="s2", steps=4,
                 grad_accum=2, warmup_steps=0, lr=1e-3, device="cuda", dtype="float32", compile=True,
                 cuda_graphs=graphs, gradient_checkpointing=False, offload_activations=False,
                 eval_data=[str(sample_data_dir)], eval_tokens=128, eval_every=2, notify=lambda message: None)
        record = json.loads((out / "training.json").read_text())
        runs[graphs] = (record["loss_curve"], [point["loss"] for point in record["validation"]["curve"]])
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_compiled_layers_without_checkpointing_train_the_same_with_activations_offloaded(
        tiny_model_dir, sample_data_dir, tmp_path):
    """On a GPU, compiled layers keep every activation without checkpointing; offloaded to the
    host they must come back with their strides (the compiled backward checks them), and the
    run trains the same steps as one that keeps them on the GPU."""
    import json

    from scca_eval import finetune

    curves = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        finetune(str(tiny_model_dir), ctx=64, out=out, data=[str(sample_data_dir)], pattern="full", steps=3,
                 grad_accum=2, warmup_steps=0, lr=1e-3, device="cuda", dtype="float32", compile=True,
                 gradient_checkpointing=False, cuda_graphs=False, offload_activations=offload,
                 notify=lambda message: None)
        record = json.loads((out / "training.json").read_text())
        assert record["runtime"]["activations"]["offloaded"] is offload
        curves[offload] = record["loss_curve"]
    torch.testing.assert_close(curves[True], curves[False], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_a_step_under_cuda_graphs_launches_graphs():
    """After the eager first pass and the recording, a step replays the layers' CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile

    from scca_eval.training.lora import compile_layers

    model = tiny_llama().cuda()
    recipe = Recipe(ctx=32, batch_size=1, grad_accum=1, warmup_steps=0, gradient_checkpointing=False,
                    offload_activations=False, compile=True, cuda_graphs=True)
    peft_model = attach_lora(model, recipe, "tiny")
    compile_layers(peft_model, cuda_graphs=True)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 32 * 8).astype(np.int64)
    trainer = Trainer(peft_model, TrainingStream(tokens, 32, None, [], "random"), recipe, torch.device("cuda"), None)
    for _ in range(3):  # eager first pass, then recording, then replays
        trainer.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        trainer.step()
    assert any("cudaGraphLaunch" in event.key for event in profiler.key_averages())
