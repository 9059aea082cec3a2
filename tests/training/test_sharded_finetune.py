"""`scca-eval finetune --shard`: the model split over the processes with FSDP2, on CPU (gloo).

What each unit holds and that a sharded forward/backward equals the plain one (one
process, a one-rank group); two processes training the weights of one process and writing
the files one process writes; a resumed sharded run ending where an uninterrupted one does."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import run_cli

CTX = 64
RECIPE = dict(ctx=CTX, pattern="s2", batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=1,
              keep_checkpoint=True)  # the tests compare optimizer states and resume finished runs


def _ids(model_dir, n=CTX, seed=0):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    return torch.from_numpy(np.random.default_rng(seed).integers(2, vocab, size=(2, n))).long()


@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo, in-memory store), removed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=["untied", "tied"])
def model_dir(request, tiny_model_dir, tmp_path_factory):
    """The tiny model, and the same with the LM head tied to the embedding (as SmolLM2's is)."""
    if request.param == "untied":
        return tiny_model_dir
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tiny-tied")
    for path in tiny_model_dir.iterdir():
        if path.name.startswith("tokenizer"):
            shutil.copy(path, folder / path.name)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_each_decoder_layer_is_a_unit_and_the_sharded_pass_equals_the_plain_one(model_dir, one_rank_group):
    """bfloat16 frozen weights beside float32 trained ones in one unit, under autocast: the
    loss and every gradient equal those of the same model unsharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from scca_eval.models import load_model
    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing, keep_activations_in
    from scca_eval.training.lora import trainable_parameters
    from scca_eval.training.loop import WindowLoss
    from scca_eval.training.recipe import Recipe
    from scca_eval.training.sharding import full_trainable_state, is_sharded, shard_for_training

    def prepared():
        lm, _ = load_model(str(model_dir), pattern="s2", dtype="bfloat16", device="cpu")
        model = attach_lora(lm, Recipe(ctx=CTX), "tiny")
        with torch.no_grad():  # LoRA's B starts at zero: move it so that LoRA's A gets gradients too
            for name, p in trainable_parameters(model).items():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        enable_gradient_checkpointing(model)
        keep_activations_in(model, torch.bfloat16)
        return model.train()

    ids = _ids(model_dir)

    def loss_and_grads(module, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(ids)
        loss.backward()
        grads = {name: p.grad for name, p in trainable_parameters(model).items()}
        return loss.detach(), {name: g.full_tensor() if isinstance(g, DTensor) else g for name, g in grads.items()}

    plain = prepared()
    expected_loss, expected_grads = loss_and_grads(WindowLoss(plain, 16), plain)
    expected_weights = full_trainable_state(plain)

    model = prepared()
    root = shard_for_training(model, torch.device("cpu"), world_size=1, is_main=True, loss_chunk=16)
    layers = list(model.get_base_model().get_decoder().layers)
    assert isinstance(root, FSDPModule) and all(isinstance(layer, FSDPModule) for layer in layers)
    assert sum(isinstance(m, FSDPModule) for m in root.modules()) == len(layers) + 1  # layers + root, no more
    assert is_sharded(model) and all(isinstance(p, DTensor) and p.placements == (Shard(0),)
                                     for p in model.parameters())
    for name, p in model.named_parameters():  # trained weights in float32, frozen ones as loaded
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    weights = full_trainable_state(model)
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)  # rank 0's weights, unchanged

    loss, grads = loss_and_grads(root, model)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert expected_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- two processes

RUNS = textwrap.dedent("""
    # Three sharded runs in one process group: 3 steps straight; 2 steps, then resumed to 3.
    import json, sys
    from scca_eval import distributed, finetune

    model, data, out = sys.argv[1:4]
    options = json.loads(sys.argv[4])
    ranks, device = distributed.setup("cpu")
    try:
        finetune(model, out=out + "/straight", data=[data], device=device, shard=True, steps=3, **options)
        finetune(model, out=out + "/resumed", data=[data], device=device, shard=True, steps=2, **options)
        finetune(model, out=out + "/resumed", data=[data], device=device, shard=True, steps=3, resume=True,
                 **options)
    finally:
        distributed.teardown()
""")


@pytest.fixture(scope="module")
def sharded_runs(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """Two gloo processes (torchrun's own launcher): the folders of the three runs above."""
    import os

    work = tmp_path_factory.mktemp("sharded")
    script = work / "runs.py"
    script.write_text(RUNS, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tiny_model_dir), str(sample_data_dir), str(work), json.dumps(RECIPE)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return work


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _trained(folder):
    return torch.load(folder / "trainable_params.bin", weights_only=True)


def _optimizer_state(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)["optimizer"]


def test_two_sharded_processes_train_the_weights_of_one_process(sharded_runs, tiny_model_dir, sample_data_dir,
                                                                tmp_path):
    """Each rank takes half the passes of a step; FSDP sums the gradients into the shards. The
    files are those a one-process run writes, with its weights within float tolerance."""
    from scca_eval import finetune

    straight = sharded_runs / "straight"
    one = tmp_path / "one"
    record = finetune(str(tiny_model_dir), out=one, data=[str(sample_data_dir)], device="cpu", steps=3,
                      notify=lambda message: None, **RECIPE)
    sharded = json.loads((straight / "training.json").read_text())
    assert sharded["runtime"]["sharded"] is True and sharded["runtime"]["processes"] == 2
    assert record["runtime"]["sharded"] is False
    assert sorted(p.name for p in straight.iterdir()) == sorted(p.name for p in one.iterdir())
    assert sharded["loss_curve"] == pytest.approx(record["loss_curve"], rel=1e-6)
    assert sharded["grad_norm_curve"] == pytest.approx(record["grad_norm_curve"], rel=1e-5)  # summed, not averaged
    for load in (_adapter, _trained):
        left, right = load(one), load(straight)
        assert left.keys() == right.keys()
        for key in left:
            assert right[key].shape == left[key].shape and right[key].dtype == torch.float32, key
            torch.testing.assert_close(right[key], left[key], rtol=1e-4, atol=1e-6, msg=key)
    left, right = _optimizer_state(one), _optimizer_state(straight)
    assert right["param_groups"] == left["param_groups"]  # the same numbering and settings
    assert right["state"].keys() == left["state"].keys()
    for index, state in left["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(right["state"][index][name], value, rtol=1e-4, atol=1e-8, msg=(index, name))
    assert any(v.abs().max() > 0 for v in _adapter(straight).values())  # LoRA's B moved from zero


def test_sharded_output_loads_in_ppl_as_in_peft(sharded_runs, tiny_model_dir):
    """ppl --adapter's loading gives the logits of peft's own PeftModel.from_pretrained on a base
    into which trainable_params.bin was loaded (LongLoRA's merge script's way)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from scca_eval.models import load_model

    straight = sharded_runs / "straight"
    ids = _ids(tiny_model_dir, n=40, seed=3)
    ours, _ = load_model(str(tiny_model_dir), adapter=str(straight), device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not base.load_state_dict(_trained(straight), strict=False).unexpected_keys
    theirs = PeftModel.from_pretrained(base, str(straight)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_resumed_sharded_run_equals_an_uninterrupted_one(sharded_runs):
    """Stopped after step 2 (its checkpoint gathered whole on rank 0), resumed by two processes
    that shard it again: the same weights, AdamW state and losses as three steps straight."""
    straight, resumed = sharded_runs / "straight", sharded_runs / "resumed"
    assert json.loads((resumed / "training.json").read_text())["runtime"]["resumed_from_step"] == 2
    for load in (_adapter, _trained):
        left, right = load(straight), load(resumed)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    left, right = _optimizer_state(straight), _optimizer_state(resumed)
    for index, state in left["state"].items():
        for name, value in state.items():
            assert torch.equal(right["state"][index][name], value), (index, name)
    assert json.loads((resumed / "training.json").read_text())["loss_curve"] == \
        json.loads((straight / "training.json").read_text())["loss_curve"]


def test_a_sharded_checkpoint_resumes_in_one_process(sharded_runs, tiny_model_dir, sample_data_dir, tmp_path):
    """checkpoint.pt of a sharded run is a one-process checkpoint: one process continues it to
    step 4 and ends with the weights of one process's four steps straight."""
    import shutil

    from scca_eval import finetune

    options = dict(data=[str(sample_data_dir)], device="cpu", steps=4, notify=lambda message: None, **RECIPE)
    continued = tmp_path / "continued"
    shutil.copytree(sharded_runs / "straight", continued)
    record = finetune(str(tiny_model_dir), out=continued, resume=True, **options)
    assert record["runtime"]["resumed_from_step"] == 3 and record["runtime"]["sharded"] is False
    finetune(str(tiny_model_dir), out=tmp_path / "four", **options)
    for load in (_adapter, _trained):
        left, right = load(tmp_path / "four"), load(continued)
        for key in left:
            torch.testing.assert_close(right[key], left[key], rtol=1e-4, atol=1e-6, msg=key)


def test_shard_needs_several_processes(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    status, _, err = run_cli(["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx",
                              str(CTX), "--device", "cpu", "--shard", "--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "--shard splits the model over several processes" in lines[0]
    assert not out.exists()
