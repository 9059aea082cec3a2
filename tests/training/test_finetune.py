"""`scca-eval finetune`: the loss against transformers' own, the saved folder against peft's
own loading, resume after Ctrl-C and after SIGKILL (bitwise on CPU), and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CtrlCAtStep, launch_two_processes, make_record
from scca_eval.cli import main

CTX = 64
# A few quick steps: 2 windows per pass, 2 passes per step.
QUICK = dict(steps=3, batch_size=2, grad_accum=2, warmup_steps=1, lr=1e-3, save_every=2)


def _finetune(model_dir, data_dir, out, **options):
    from scca_eval import finetune

    settings = {"keep_checkpoint": True, **QUICK, **options}  # the tests compare optimizer states
    return finetune(str(model_dir), ctx=settings.pop("ctx", CTX), out=out, data=[str(data_dir)],
                    pattern=settings.pop("pattern", "s2"), notify=lambda message: None, **settings)


def _run_cli(args, capsys):
    capsys.readouterr()  # only what the command writes
    with pytest.raises(SystemExit) as caught:
        main(args)
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sample_data_dir, tmp_path_factory):
    """One quick run under s2 with linear RoPE interpolation, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("finetuned") / "s2"
    record = _finetune(tiny_model_dir, sample_data_dir, out, rope_scaling="linear:2")
    return out, record


def _ids(tiny_model_dir, n=48, seed=0):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    return torch.from_numpy(np.random.default_rng(seed).integers(2, vocab, size=(2, n))).long()


# ---------------------------------------------------------------- the loss and its gradients

@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_loss_and_gradients_equal_transformers_own(tiny_model_dir, checkpointing):
    """The chunked, checkpointed loss is model(ids, labels=ids).loss, with the same gradients."""
    from scca_eval.models import load_model
    from scca_eval.training.lora import attach_lora, enable_gradient_checkpointing, trainable_parameters
    from scca_eval.training.loop import window_nll_sum
    from scca_eval.training.recipe import Recipe

    lm, _ = load_model(str(tiny_model_dir), pattern="s2", device="cpu")
    model = attach_lora(lm, Recipe(ctx=CTX), str(tiny_model_dir))
    params = trainable_parameters(model)
    with torch.no_grad():  # LoRA's B starts at zero: move it so LoRA's A gets gradients too
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    ids = _ids(tiny_model_dir)

    ours = window_nll_sum(model, ids, loss_chunk=17) / (ids.numel() - ids.shape[0])
    ours.backward()
    our_grads = {name: p.grad.clone() for name, p in params.items()}
    model.zero_grad(set_to_none=True)
    theirs = model(input_ids=ids, labels=ids, use_cache=False).loss
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert any(name.endswith("embed_tokens.weight") for name in params)
    assert any("norm" in name for name in params) and any("lora_A" in name for name in params)
    for name, p in params.items():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bfloat16_weights_train_float32_copies_under_autocast(tiny_model_dir, sample_data_dir, tmp_path):
    from safetensors.torch import load_file

    record = _finetune(tiny_model_dir, sample_data_dir, tmp_path / "bf16", dtype="bfloat16", steps=2)
    assert record["dtype"] == "bfloat16" and all(np.isfinite(record["loss_curve"]))
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "bf16" / "adapter_model.safetensors").values())
    state = torch.load(tmp_path / "bf16" / "trainable_params.bin", weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())


@pytest.mark.gpu
def test_offloaded_activations_train_the_same_weights(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    """On a GPU what autograd saves waits in host memory and comes back unchanged: a run with
    offloading ends with the weights of a run without it, and it did move tensors to the host."""
    from scca_eval.training import offload as offload_module

    moved = []
    pack = offload_module.HostOffload._pack

    def recording_pack(self, tensor):
        moved.append(tensor.is_cuda)
        return pack(self, tensor)

    monkeypatch.setattr(offload_module.HostOffload, "_pack", recording_pack)
    runs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        _finetune(tiny_model_dir, sample_data_dir, out, device="cuda", dtype="float32", offload_activations=offload,
                  gradient_checkpointing=True)  # auto would take CUDA graphs where nothing is offloaded
        runs[offload] = torch.load(out / "trainable_params.bin", weights_only=True)
        if not offload:
            assert moved == []
    assert sum(moved) > 0  # GPU tensors were sent to the host (beside a few saved CPU tensors)
    for name, kept in runs[False].items():  # equal up to the GPU's atomic-add order in the embedding backward
        torch.testing.assert_close(runs[True][name], kept, rtol=1e-5, atol=1e-5, msg=name)


def _lora_bf16(tiny_model_dir):
    from scca_eval.models import load_model
    from scca_eval.training.lora import attach_lora
    from scca_eval.training.recipe import Recipe

    lm, _ = load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    model = attach_lora(lm, Recipe(ctx=CTX), str(tiny_model_dir))
    # peft starts LoRA B at zero, where the LoRA path would add nothing and get no gradient
    # into A: move it off zero so that the path's input dtype shows in loss and gradients.
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_trained_float32_weights_feed_every_layer_in_the_compute_dtype(tiny_model_dir):
    from scca_eval.training.lora import keep_activations_in

    model = _lora_bf16(tiny_model_dir)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.float32  # trained: float32 master copy
    assert base.model.norm.weight.dtype == torch.float32
    ids = _ids(tiny_model_dir)
    # The reference: autocast alone, with only the embedding's output cast (a bfloat16 residual
    # stream), so every projection casts the float32 norm outputs it reads for itself.
    embedding_only = base.get_input_embeddings().register_forward_hook(lambda m, i, out: out.to(torch.bfloat16))
    reference_loss, reference_grads = _loss_and_grads(model, ids)
    embedding_only.remove()

    handle = keep_activations_in(model, torch.bfloat16)
    seen = {}
    probes = [module.register_forward_pre_hook(lambda m, inputs, name=name: seen.__setitem__(name, inputs[0].dtype))
              for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)]
    loss, grads = _loss_and_grads(model, ids)
    for probe in probes:
        probe.remove()
    # Every linear layer, base projection or LoRA A/B, gets its input already in bfloat16.
    assert any("lora_A" in name for name in seen) and any("q_proj.base_layer" in name for name in seen)
    assert {name: dtype for name, dtype in seen.items() if dtype != torch.bfloat16} == {}
    # Each value the matrix products see is rounded once either way: the same loss, bit for bit.
    assert torch.equal(loss, reference_loss)
    # The norms' output gradients are summed in bfloat16 instead of float32: close, not equal.
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert (grad - reference_grads[name]).norm() <= 0.02 * reference_grads[name].norm(), name
    assert all(grads[name].norm() > 0 for name in grads if "norm" in name or "embed" in name or "lora_A" in name)

    handle.remove()  # undone: peft casts LoRA inputs again, and no output is cast
    assert all(module.cast_input_dtype_enabled for name, module in base.named_modules() if name.endswith("q_proj"))
    assert base.model.norm(torch.ones(1, 64, dtype=torch.bfloat16)).dtype == torch.float32


def _tiny_lora(model_type: str, targets: tuple[str, ...]):
    from transformers import AutoConfig, AutoModelForCausalLM

    from scca_eval.training.lora import attach_lora
    from scca_eval.training.recipe import Recipe

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    return attach_lora(lm, Recipe(ctx=CTX, lora_targets=targets), model_type)


@pytest.mark.parametrize("model_type,targets,cast,kept", [
    # LLaMA's pre-norm layout: the norms feeding projections are cast; Qwen3's q_norm, which
    # feeds the rotary embedding, keeps its float32 output.
    ("qwen3", ("q_proj", "v_proj"), ["input_layernorm", "post_attention_layernorm"], ["q_norm"]),
    # a layout not in the list: only the embedding's output is cast
    ("phi3", ("qkv_proj",), [], ["input_layernorm", "post_attention_layernorm"]),
])
def test_norms_are_cast_once_only_in_the_pre_norm_layout(model_type, targets, cast, kept):
    from scca_eval.training.lora import keep_activations_in

    model = _tiny_lora(model_type, targets)
    base = model.get_base_model()
    layer = base.model.layers[0]
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    handle = keep_activations_in(model, torch.bfloat16)
    assert base.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.bfloat16
    for name in cast:
        assert getattr(layer, name).weight.requires_grad and getattr(layer, name)(x).dtype == torch.bfloat16, name
    for name in kept:
        module = getattr(layer.self_attn, name, None) or getattr(layer, name)
        assert module.weight.requires_grad and module(x if name != "q_norm" else x[..., :16]).dtype == torch.float32, name
    handle.remove()


def test_window_order_is_seeded_and_covers_every_window():
    from scca_eval.training.windows import window_index

    first = [window_index(7, k, 10) for k in range(10)]
    assert sorted(first) == list(range(10))
    assert [window_index(7, k, 10) for k in range(10, 20)] != first  # each pass has its own order
    assert sorted(window_index(7, k, 10) for k in range(10, 20)) == list(range(10))
    assert [window_index(8, k, 10) for k in range(10)] != first
    assert [window_index(7, k, 10) for k in range(10)] == first


# ---------------------------------------------------------------- what a run writes

def test_training_record(trained, sample_data_dir):
    out, record = trained
    saved = json.loads((out / "training.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["steps"] == 3 and len(saved["loss_curve"]) == 3 and saved["finished"]
    assert saved["pattern_name"] == "s2" and saved["pattern"]["name"] == "s2"
    assert saved["rope_scaling"]["factor"] == 2.0
    assert saved["tokens_seen"] == 3 * 4 * CTX and saved["ctx"] == CTX
    assert saved["base_model"]["fingerprint"]["digest"].startswith("sha256:")
    documents = saved["data"]["tasks"][0]["documents"]
    assert sorted(documents) == sorted(p.name for p in Path(sample_data_dir).iterdir())
    assert saved["lr_curve"][0] == 0.0 and saved["lr_curve"][1] == pytest.approx(1e-3)  # warm-up of 1 step
    assert saved["recipe"]["lora_rank"] == 8 and saved["recipe"]["trainable"] == ["embed", "norm"]
    assert saved["runtime"]["tokens_per_second"] > 0 and saved["runtime"]["peak_memory"]["bytes"] > 0
    assert all(np.isfinite(saved["loss_curve"]))


def test_saved_folder_loads_in_ppl_as_in_peft_and_longlora_merge(trained, tiny_model_dir):
    """ppl --adapter's loading gives the logits of peft's own PeftModel.from_pretrained on a base
    into which trainable_params.bin was loaded as LongLoRA's merge script loads it."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from scca_eval.models import load_model, model_record

    out, _ = trained
    ids = _ids(tiny_model_dir, n=40, seed=3)
    ours, tokenizer = load_model(str(tiny_model_dir), adapter=str(out), device="cpu")  # RoPE from training.json
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0,
                              "rope_theta": config.rope_parameters["rope_theta"]}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config)
    untouched = base(ids).logits
    state = torch.load(out / "trainable_params.bin", weights_only=True)
    assert "model.embed_tokens.weight" in state and "model.norm.weight" in state
    assert not base.load_state_dict(state, strict=False).unexpected_keys  # LongLoRA's merge: strict=False
    theirs = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-3  # the training changed the model
    adapter = model_record(ours, tokenizer)["adapter"]
    assert adapter["training_pattern"] == "s2" and adapter["training"]["ctx"] == CTX
    assert model_record(ours, tokenizer)["rope_scaling"]["factor"] == 2.0


def test_ppl_records_name_the_training_pattern(trained, tiny_model_dir, sample_data_dir, tmp_path, capsys):
    out, _ = trained
    status, _, err = _run_cli(["ppl", "--model", str(tiny_model_dir), "--adapter", str(out), "--data",
                               str(sample_data_dir), "--ctx", str(CTX), "--max-tokens", "256", "--out",
                               str(tmp_path / "runs"), "--device", "cpu", "-q"], capsys)
    assert status == 0, err
    record = json.loads(next((tmp_path / "runs").glob("*.json")).read_text())
    assert record["config"]["model"]["adapter"]["training_pattern"] == "s2"
    assert record["config"]["model"]["rope_scaling"]["factor"] == 2.0
    # The fine-tune run's folder inside the results folder: table passes over its training.json
    # and adapter_config.json there, and refuses them named directly.
    import shutil

    shutil.copytree(out, tmp_path / "runs" / "ckpt")
    status, text, err = _run_cli(["table", str(tmp_path / "runs")], capsys)
    assert status == 0 and "trained under s2" in text and "| full |" in text, err
    for name, kind in (("training.json", "the training record of a fine-tune run"),
                       ("adapter_config.json", "a LoRA adapter's config")):
        status, _, err = _run_cli(["table", str(tmp_path / "runs" / "ckpt" / name)], capsys)
        assert status == 2 and f"{kind}, not a result record" in err, err
    status, _, err = _run_cli(["table", str(tmp_path / "runs" / "ckpt")], capsys)  # the run's folder alone
    assert status == 2 and "holds no result records, only a LoRA adapter's config and the training record" in err, err


# ---------------------------------------------------------------- stopping and resuming

def _same_run(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors",):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key
    left = torch.load(a / "trainable_params.bin", weights_only=True)
    right = torch.load(b / "trainable_params.bin", weights_only=True)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    saved_a = torch.load(a / "checkpoint.pt", weights_only=True)
    saved_b = torch.load(b / "checkpoint.pt", weights_only=True)
    for key, state in saved_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, saved_b["optimizer"]["state"][key][name]), (key, name)
    assert json.loads((a / "training.json").read_text())["loss_curve"] == \
        json.loads((b / "training.json").read_text())["loss_curve"]


def test_ctrl_c_saves_and_resume_ends_bitwise_equal(trained, tiny_model_dir, sample_data_dir, tmp_path):
    from scca_eval.evaluation.resume import Interrupted

    straight, _ = trained
    stopped = tmp_path / "stopped"


    with pytest.raises(Interrupted, match="step 2 of 3 is saved .* --resume"):
        _finetune(tiny_model_dir, sample_data_dir, stopped, rope_scaling="linear:2", save_every=100,
                  progress=CtrlCAtStep(2))
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["history"]["step"] == 2
    assert not (stopped / "training.json").exists()
    record = _finetune(tiny_model_dir, sample_data_dir, stopped, rope_scaling="linear:2", resume=True)
    assert record["runtime"]["resumed_from_step"] == 2
    _same_run(straight, stopped)


def test_sigkill_then_resume_ends_bitwise_equal(tiny_model_dir, sample_data_dir, tmp_path):
    steps = 20
    options = dict(pattern="scca_fixed", steps=steps, warmup_steps=3)
    args = ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", str(CTX), "--pattern",
            "scca_fixed", "--steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
            "--warmup-steps", "3", "--device", "cpu", "-q"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # One thread everywhere: CPU sums are bitwise repeatable for a given thread count, and a
    # busy machine runs small models much faster on one.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scca_eval", "finetune", *args, "--out", str(killed), "--keep-checkpoint"]
    process = subprocess.Popen([*command, "--save-every", "1"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    checkpoint = killed / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if checkpoint.is_file():
            try:
                if torch.load(checkpoint, weights_only=True)["history"]["step"] >= 2:
                    break
            except Exception:  # replaced while being read
                pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    at = torch.load(checkpoint, weights_only=True)["history"]["step"]
    assert 2 <= at < steps and not (killed / "training.json").exists()

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _finetune(tiny_model_dir, sample_data_dir, straight, **options)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((killed / "training.json").read_text())["runtime"]["resumed_from_step"] == at
    _same_run(straight, killed)


def test_a_finished_run_removes_its_checkpoint_unless_asked_to_keep_it(tiny_model_dir, sample_data_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", str(CTX),
            "--steps", "1", "--grad-accum", "1", "--device", "cpu", "-q", "--out", str(out)]
    status, _, err = _run_cli(args, capsys)
    assert status == 0, err
    assert (out / "training.json").is_file() and not (out / "checkpoint.pt").exists()
    _refused(capsys, [*args[1:], "--resume"], "finished and its checkpoint.pt was removed")
    kept = tmp_path / "kept"
    status, _, err = _run_cli([*args[:-1], str(kept), "--keep-checkpoint"], capsys)
    assert status == 0 and (kept / "checkpoint.pt").is_file() and "is kept" in err


# ---------------------------------------------------------------- bad input

def _refused(capsys, args, match):
    status, _, err = _run_cli(["finetune", *args], capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]


def test_bad_options_are_refused_before_anything_is_written(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--out", str(out), "--device", "cpu"]
    _refused(capsys, [*common, "--ctx", "64", "--steps", "0"], "--steps must be")
    _refused(capsys, [*common, "--ctx", "64", "--pattern", "s2", "--chunk-size", "128"], "above ctx 64")
    _refused(capsys, [*common, "--ctx", "64", "--lr", "-1"], "--lr must be")
    _refused(capsys, [*common, "--ctx", "64", "--tokens-per-step", "100"], "multiple of")
    _refused(capsys, [*common, "--ctx", "64", "--lora-targets", "nonexistent_proj"], "--lora-targets")
    _refused(capsys, [*common, "--ctx", "64", "--trainable", "embed,nothing_matches"],
             "--trainable nothing_matches matches no weight")
    _refused(capsys, [*common, "--ctx", "64", "--rope-scaling", "cubic:2"], "--rope-scaling")
    _refused(capsys, [*common, "--ctx", "4096"], "beyond the 2048 tokens the model's RoPE settings cover")
    _refused(capsys, [*common, "--ctx", "64", "--resume"], "holds no checkpoint.pt")
    assert not out.exists()
    (tmp_path / "tiny.txt").write_text("A few words only.", encoding="utf-8")
    _refused(capsys, ["--model", str(tiny_model_dir), "--data", str(tmp_path / "tiny.txt"), "--out", str(out),
                      "--ctx", "64", "--device", "cpu"], "fewer than one training window")
    assert not out.exists()


def test_a_model_folder_is_refused_as_out(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """Training into the base model's own folder would change its weights fingerprint (ppl would
    then refuse it as the adapter's base): refused before anything is written."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = sorted(p.name for p in model.iterdir())
    common = ["--data", str(sample_data_dir), "--ctx", "64", "--steps", "1", "--device", "cpu"]
    _refused(capsys, ["--model", str(model), "--out", str(model), *common], "holds a model (config.json)")
    assert sorted(p.name for p in model.iterdir()) == before


def test_no_disk_space_is_refused_before_training(tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "full"
    _refused(capsys, ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--out", str(out),
                      "--ctx", "64", "--device", "cpu"], "not enough disk space")
    assert not out.exists()


def test_another_run_in_the_folder_is_refused(trained, tiny_model_dir, sample_data_dir, tmp_path, capsys):
    out, _ = trained
    common = ["--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--out", str(out), "--ctx", "64",
              "--device", "cpu", "--pattern", "s2", "--rope-scaling", "linear:2", "--steps", "3",
              "--batch-size", "2", "--grad-accum", "2", "--warmup-steps", "1"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _refused(capsys, [*common, "--lr", "1e-3"], "pass --resume")
    _refused(capsys, [*common, "--lr", "2e-3", "--resume"], "differs in recipe.lr")
    _refused(capsys, [*common, "--lr", "1e-3", "--steps", "2", "--resume"], "beyond --steps 2")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_adapter_for_another_base_is_refused(trained, tiny_model_dir, sample_data_dir, tmp_path, capsys):
    """Same shapes, other weights: refused by training.json's base fingerprint, in ppl and in --resume."""
    import shutil

    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    model.save_pretrained(other)
    out, _ = trained
    status, _, err = _run_cli(["ppl", "--model", str(other), "--adapter", str(out), "--data", str(sample_data_dir),
                               "--ctx", "64", "--no-write", "-q", "--device", "cpu"], capsys)
    assert status == 2 and "was fine-tuned from" in err and len(err.strip().splitlines()) == 1, err
    _refused(capsys, ["--model", str(other), "--data", str(sample_data_dir), "--out", str(out), "--ctx", "64",
                      "--device", "cpu", "--pattern", "s2", "--rope-scaling", "linear:2", "--steps", "3",
                      "--batch-size", "2", "--grad-accum", "2", "--warmup-steps", "1", "--lr", "1e-3",
                      "--resume"], "the base model")


# ---------------------------------------------------------------- the default model

def test_default_training_data_is_the_bundled_training_samples():
    from scca_eval.data import load_task
    from scca_eval.training.recipe import DEFAULT_TASKS

    assert DEFAULT_TASKS == ("pg19_train", "proof_pile_train")
    assert all(load_task(name).name == name for name in DEFAULT_TASKS)


@pytest.mark.slow
def test_default_model_finetunes_and_evaluates(tmp_path, capsys):
    out = tmp_path / "default-longmixed"
    status, text, err = _run_cli(["finetune", "--pattern", "longmixed", "--ctx", "256", "--steps", "2",
                                  "--grad-accum", "1", "--device", "cpu", "--task", "proof_pile_train",
                                  "--out", str(out), "-q"], capsys)
    assert status == 0, err
    record = json.loads((out / "training.json").read_text())
    assert record["base_model"]["id"] == "default" and len(record["loss_curve"]) == 2
    assert [t["name"] for t in record["data"]["tasks"]] == ["proof_pile_train"]
    assert record["base_model"]["fingerprint"]["method"] == "sha256" and "trained 2 steps" in text
    status, text, err = _run_cli(["ppl", "--adapter", str(out), "--ctx", "256", "--max-tokens", "512",
                                  "--no-write", "-q", "--device", "cpu"], capsys)
    assert status == 0, err
    assert "| full |" in text


# ---------------------------------------------------------------- data parallel

def test_two_gloo_processes_train_the_weights_of_one_process(tiny_model_dir, sample_data_dir, tmp_path):
    """torchrun with two CPU processes: each takes half the passes of a step and the gradients are
    summed, so the run ends with the weights of a one-process run (float tolerance: the sum of the
    two halves is taken in another order). The validation windows are shared out too (3 windows:
    two on rank 0, one on rank 1) and give the one-process curve."""
    from safetensors.torch import load_file

    args = ["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", str(CTX),
            "--pattern", "s2", "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1",
            "--eval-data", str(sample_data_dir), "--eval-tokens", str(3 * CTX), "--device", "cpu", "-q"]
    done = launch_two_processes([*args, "--grad-accum", "2", "--out", str(tmp_path / "two")], tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 3 steps") == 1  # rank 0 alone reports
    one = _finetune(tiny_model_dir, sample_data_dir, tmp_path / "one", save_every=100,
                    eval_data=[str(sample_data_dir)], eval_tokens=3 * CTX)
    two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert two["runtime"]["processes"] == 2 and one["runtime"]["processes"] == 1
    assert two["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-6)
    one_curve, two_curve = one["validation"]["curve"], two["validation"]["curve"]
    assert [p["step"] for p in two_curve] == [p["step"] for p in one_curve] == [0, 3]
    for ours, theirs in zip(two_curve, one_curve):
        assert len(ours["window_losses"]) == 3
        assert ours["window_losses"] == pytest.approx(theirs["window_losses"], rel=1e-5)
    left, right = load_file(tmp_path / "one" / "adapter_model.safetensors"), \
        load_file(tmp_path / "two" / "adapter_model.safetensors")
    for key in left:
        torch.testing.assert_close(right[key], left[key], rtol=1e-4, atol=1e-6, msg=key)
    lonely = launch_two_processes([*args, "--grad-accum", "3", "--out", str(tmp_path / "three")], tmp_path,
                                  timeout=600)
    assert lonely.returncode == 2 and "multiple of 2" in lonely.stderr.strip().splitlines()[-1], lonely.stderr
