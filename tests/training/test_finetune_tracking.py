"""Watching a fine-tune: the validation curve (full attention, the training left untouched,
kept across a resume), TensorBoard event files, the convergence rule, the seed, --max-time."""

from __future__ import annotations

import json
import math
import statistics
import sys

import numpy as np
import pytest
import torch

from scca_eval.cli import main
from conftest import sample_slice
from helpers import CtrlCAtStep

CTX = 64
# 2 windows per pass, 2 passes per step; validation every 2 steps on 6 windows of 64 tokens.
QUICK = dict(steps=3, batch_size=2, grad_accum=2, warmup_steps=1, lr=1e-3, save_every=2, pattern="s2",
             rope_scaling="linear:2")
EVAL = dict(eval_every=2, eval_tokens=6 * CTX)


@pytest.fixture(scope="module")
def validation_dir(tmp_path_factory):
    """Validation text that is not in the training data (other books, other proofs)."""
    folder = tmp_path_factory.mktemp("validation")
    (folder / "sawyer.txt").write_text(sample_slice("pg19_sample/twain_tom_sawyer.txt", 3000), encoding="utf-8")
    (folder / "rineq.v").write_text(sample_slice("proof_pile_sample/coq_stdlib_reals_rineq.v", 3000),
                                    encoding="utf-8")
    return folder


def _finetune(model_dir, data_dir, out, **options):
    from scca_eval import finetune

    settings = {"keep_checkpoint": True, **QUICK, **options}  # some tests extend finished runs
    return finetune(str(model_dir), ctx=CTX, out=out, data=[str(data_dir)], notify=lambda message: None, **settings)


def _run_cli(args, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main(args)
    captured = capsys.readouterr()
    return caught.value.code, captured.out, captured.err


def _trained_state(folder) -> dict:
    from safetensors.torch import load_file

    state = dict(load_file(folder / "adapter_model.safetensors"))
    state.update(torch.load(folder / "trainable_params.bin", weights_only=True))
    return state


def _assert_same_weights(a, b) -> None:
    left, right = _trained_state(a), _trained_state(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def runs(tiny_model_dir, sample_data_dir, validation_dir, tmp_path_factory):
    """The same quick run under s2 without and with validation (LoRA dropout on: training uses the RNG)."""
    root = tmp_path_factory.mktemp("tracked")
    plain = _finetune(tiny_model_dir, sample_data_dir, root / "plain", lora_dropout=0.1)
    tracked = _finetune(tiny_model_dir, sample_data_dir, root / "tracked", lora_dropout=0.1,
                        eval_data=[str(validation_dir)], **EVAL)
    return root, plain, tracked


# ---------------------------------------------------------------- the validation curve

def _validation_windows(tiny_model_dir, validation_dir, tokens):
    from scca_eval.data import task_from_data_path, tokenize_task
    from scca_eval.models import load_model
    from scca_eval.training.validation_loss import build_validation_set

    _, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    task = tokenize_task(task_from_data_path(str(validation_dir)), tokenizer)
    validation = build_validation_set([task], tokenizer.eos_token_id, CTX, tokens)
    return validation, [torch.from_numpy(validation.stream.window(i))[None] for i in validation.indices]


def _transformers_losses(model, windows) -> list[float]:
    with torch.no_grad():
        return [float(model(input_ids=ids, labels=ids, use_cache=False).loss) for ids in windows]


def test_validation_curve_is_the_full_attention_loss_at_each_point(runs, tiny_model_dir, validation_dir):
    """The first point is the untrained model's loss with full attention (not with s2, the
    training pattern), the last the saved adapter's as ppl --adapter loads it, both computed
    here with transformers' own loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from scca_eval.models import load_model

    root, _, record = runs
    validation = record["validation"]
    curve = validation["curve"]
    assert [p["step"] for p in curve] == [0, 2, 3]  # before the first step, every 2 steps, after the last
    assert [p["tokens"] for p in curve] == [0, 2 * 4 * CTX, 3 * 4 * CTX]
    assert validation["attention"] == "full" and validation["windows"] == 6 and validation["every"] == 2
    assert json.loads((root / "tracked" / "training.json").read_text())["validation"]["curve"] == curve

    windows_set, windows = _validation_windows(tiny_model_dir, validation_dir, 6 * CTX)
    assert validation["window_indices"] == windows_set.indices
    assert windows_set.indices[0] == 0 and windows_set.indices[-1] == windows_set.stream.windows - 1  # spread

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": config.rope_parameters["rope_theta"]}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=config, attn_implementation="sdpa").eval()
    untrained = _transformers_losses(base, windows)
    np.testing.assert_allclose(curve[0]["window_losses"], untrained, rtol=1e-5)
    assert curve[0]["loss"] == pytest.approx(statistics.fmean(untrained), rel=1e-6)

    under_s2, _ = load_model(str(tiny_model_dir), pattern="s2", rope_scaling="linear:2", device="cpu")
    assert abs(statistics.fmean(_transformers_losses(under_s2, windows)) - curve[0]["loss"]) > 1e-3

    trained, _ = load_model(str(tiny_model_dir), adapter=str(root / "tracked"), device="cpu")  # full attention
    np.testing.assert_allclose(curve[-1]["window_losses"], _transformers_losses(trained, windows), rtol=1e-5)
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_validation_leaves_the_training_unchanged(runs):
    """Same weights, losses and record pattern with and without validation, bitwise (CPU)."""
    root, plain, tracked = runs
    _assert_same_weights(root / "plain", root / "tracked")
    assert tracked["loss_curve"] == plain["loss_curve"] and tracked["grad_norm_curve"] == plain["grad_norm_curve"]
    assert plain["validation"] is None and plain["convergence"] is None
    assert tracked["pattern_name"] == "s2" and tracked["runtime"]["seconds"] > 0


def test_resume_keeps_the_validation_curve(runs, tiny_model_dir, sample_data_dir, validation_dir, tmp_path):
    from scca_eval.evaluation.resume import Interrupted

    root, _, tracked = runs
    stopped = tmp_path / "stopped"


    options = dict(lora_dropout=0.1, eval_data=[str(validation_dir)], **EVAL)
    with pytest.raises(Interrupted):
        _finetune(tiny_model_dir, sample_data_dir, stopped, save_every=100, progress=CtrlCAtStep(2), **options)
    saved = torch.load(stopped / "checkpoint.pt", weights_only=True)["history"]
    assert saved["step"] == 2 and [p["step"] for p in saved["validation"]] == [0, 2]
    resumed = _finetune(tiny_model_dir, sample_data_dir, stopped, resume=True, **options)
    assert resumed["runtime"]["resumed_from_step"] == 2
    assert [p["step"] for p in resumed["validation"]["curve"]] == [0, 2, 3]
    assert [p["window_losses"] for p in resumed["validation"]["curve"]] == \
        [p["window_losses"] for p in tracked["validation"]["curve"]]
    _assert_same_weights(root / "tracked", stopped)

    with pytest.raises(Exception, match="other windows"):  # the curve must stay on one set of windows
        _finetune(tiny_model_dir, sample_data_dir, stopped, resume=True, steps=4,
                  **{**options, "eval_tokens": 4 * CTX})


def test_validation_options_are_checked_first(tiny_model_dir, sample_data_dir, validation_dir, tmp_path, capsys):
    out = tmp_path / "never"
    common = ["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--ctx", str(CTX),
              "--out", str(out), "--device", "cpu"]
    for extra, words in ((["--eval-every", "2"], "needs validation text"),
                         (["--eval-data", str(validation_dir), "--eval-every", "0"], "--eval-every must be"),
                         (["--eval-data", str(validation_dir), "--eval-tokens", "10"], "--eval-tokens must be"),
                         (["--max-time", "-1"], "--max-time must be")):
        status, _, err = _run_cli([*common, *extra], capsys)
        assert status == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not out.exists()


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_event_files_hold_the_curves(tiny_model_dir, sample_data_dir, validation_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    record = _finetune(tiny_model_dir, sample_data_dir, tmp_path / "run", steps=2, eval_every=1,
                       eval_tokens=2 * CTX, eval_data=[str(validation_dir)], log_dir=str(logs))
    assert list(logs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logs))
    events.Reload()

    def scalars(tag):
        return [(event.step, event.value) for event in events.Scalars(tag)]

    assert scalars("train/loss") == [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(record["loss_curve"])]
    assert scalars("train/lr") == [(i + 1, pytest.approx(v, rel=1e-6)) for i, v in enumerate(record["lr_curve"])]
    assert [step for step, _ in scalars("train/grad_norm")] == [1, 2]
    assert all(value > 0 for _, value in scalars("train/tokens_per_second"))
    assert scalars("validation/loss") == [(p["step"], pytest.approx(p["loss"], rel=1e-6))
                                          for p in record["validation"]["curve"]]


def test_without_tensorboard_log_dir_is_one_line(tiny_model_dir, sample_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    status, _, err = _run_cli(["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir),
                               "--ctx", str(CTX), "--out", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs"),
                               "--device", "cpu"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "scca-eval[tensorboard]" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- the convergence rule

def _curve(steps, window_losses):
    return [{"step": s, "tokens": 0, "loss": statistics.fmean(w), "window_losses": list(w)}
            for s, w in zip(steps, window_losses)]


def test_convergence_rule_on_synthetic_curves():
    from scca_eval.training.convergence import convergence

    rng = np.random.default_rng(0)
    difficulty = rng.uniform(2.0, 6.0, size=8)  # windows differ a lot by themselves
    steps = list(range(0, 101, 5))

    # Still falling by 0.02 nats per point on every window, with small point-to-point noise.
    falling = [difficulty + 1.0 - 0.02 * i + rng.normal(0, 0.003, 8) for i in range(len(steps))]
    result = convergence(_curve(steps, falling), 100)
    assert result["last_tenth_steps"] == [95, 100] and result["previous_tenth_steps"] == [85, 90]
    # The same numbers computed here: per-window means of each tenth, paired differences.
    last = (falling[-1] + falling[-2]) / 2
    previous = (falling[-3] + falling[-4]) / 2
    differences = last - previous
    assert result["change"] == pytest.approx(differences.mean(), rel=1e-9)
    assert result["standard_error"] == pytest.approx(differences.std(ddof=1) / math.sqrt(8), rel=1e-9)
    assert result["converged"] is False and result["direction"] == "falling"
    assert result["change"] == pytest.approx(-0.04, abs=0.01)
    unpaired_noise = 2 * math.sqrt(last.var(ddof=1) / 8 + previous.var(ddof=1) / 8)
    assert abs(last.mean() - previous.mean()) < unpaired_noise  # what pairing by window avoids

    # Flat: no trend, the same noise. An unpaired comparison would call the falling curve flat
    # too (the windows' own spread is ~1 nat), the paired rule does not.
    flat = [difficulty + rng.normal(0, 0.003, 8) for _ in steps]
    result = convergence(_curve(steps, flat), 100)
    assert result["converged"] is True and result["direction"] == "flat"
    assert abs(result["change"]) < 2 * result["standard_error"]

    rising = [difficulty + 0.02 * i + rng.normal(0, 0.003, 8) for i in range(len(steps))]
    assert convergence(_curve(steps, rising), 100)["direction"] == "rising"

    sparse = convergence(_curve([0, 50, 100], falling[:3]), 100)  # no point in (80, 90]
    assert sparse["converged"] is None and "--eval-every 10 or less" in sparse["reason"]
    one_window = convergence(_curve(steps, [w[:1] for w in flat]), 100)
    assert one_window["converged"] is None and "--eval-tokens" in one_window["reason"]
    short = convergence(_curve([0, 1, 2, 3, 4, 5], [w for w in flat[:6]]), 5)  # a tenth is at least one step
    assert short["last_tenth_steps"] == [5] and short["previous_tenth_steps"] == [4]


def test_training_record_reports_convergence(runs):
    _, _, record = runs
    rule = record["convergence"]
    assert rule["last_tenth_steps"] == [3] and rule["previous_tenth_steps"] == [2]
    assert isinstance(rule["converged"], bool) and rule["windows"] == 6
    curve = record["validation"]["curve"]
    assert rule["change"] == pytest.approx(curve[-1]["loss"] - curve[-2]["loss"], rel=1e-9)


def test_training_record_shares_the_records_schema_and_device_name(runs):
    """training.json is built with the evaluation records: one schema, one way to name the device."""
    from scca_eval.records import SCHEMA, device_name

    _, _, record = runs
    assert record["schema"] == SCHEMA
    assert record["runtime"]["device"] == device_name(torch.device("cpu"))
    assert record["runtime"]["device"].startswith("cpu (") and "thread" in record["runtime"]["device"]


# ---------------------------------------------------------------- the seed

def test_seed_drives_lora_initialisation_and_window_order(tiny_model_dir, sample_data_dir):
    from scca_eval.data import task_from_data_path, tokenize_task
    from scca_eval.models import load_model
    from scca_eval.training.lora import attach_lora
    from scca_eval.training.recipe import Recipe
    from scca_eval.training.windows import batch_ids, build_stream

    def lora_a(seed):
        lm, _ = load_model(str(tiny_model_dir), device="cpu")
        torch.manual_seed(1234 + seed)  # whatever ran before: the seed alone decides
        torch.rand(10)
        model = attach_lora(lm, Recipe(ctx=CTX, seed=seed), str(tiny_model_dir))
        return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}

    first, again, other = lora_a(0), lora_a(0), lora_a(1)
    assert first and all(torch.equal(first[name], again[name]) for name in first)
    assert all(not torch.equal(first[name], other[name]) for name in first)

    _, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    stream = build_stream([tokenize_task(task_from_data_path(str(sample_data_dir)), tokenizer)],
                          tokenizer.eos_token_id, CTX)
    assert stream.windows >= 8
    order = {seed: batch_ids(stream, seed, 0, stream.windows) for seed in (0, 1)}
    assert np.array_equal(batch_ids(stream, 0, 0, stream.windows), order[0])
    assert not np.array_equal(order[0], order[1])
    # Each order is a permutation of the same windows.
    assert sorted(map(bytes, order[0])) == sorted(map(bytes, order[1]))


# ---------------------------------------------------------------- --max-time

def test_max_time_stops_at_a_step_boundary_and_says_so(runs, tiny_model_dir, sample_data_dir, validation_dir,
                                                       tmp_path, capsys):
    root, _, tracked = runs
    out = tmp_path / "timed"
    status, text, err = _run_cli(
        ["finetune", "--model", str(tiny_model_dir), "--data", str(sample_data_dir), "--eval-data",
         str(validation_dir), "--eval-every", "2", "--eval-tokens", str(6 * CTX), "--ctx", str(CTX), "--pattern",
         "s2", "--rope-scaling", "linear:2", "--steps", "3", "--batch-size", "2", "--grad-accum", "2",
         "--warmup-steps", "1", "--lr", "1e-3", "--lora-dropout", "0.1", "--save-every", "2",
         "--max-time", "1e-6", "--device", "cpu", "--out", str(out), "-q"], capsys)
    assert status == 0, err
    record = json.loads((out / "training.json").read_text())
    # Any step takes longer than a microsecond: the run stops after its first.
    assert record["steps"] == 1 and record["stopped_by"] == "max_time" and record["recipe"]["max_time"] == 1e-6
    assert record["runtime"]["seconds"] >= 1e-6 and "stopped by --max-time" in text
    assert [p["step"] for p in record["validation"]["curve"]] == [0, 1]  # the last step gets its point
    assert torch.load(out / "checkpoint.pt", weights_only=True)["history"]["step"] == 1

    # --max-time is no part of the weights: resumed without it, the run ends as the untimed one did.
    resumed = _finetune(tiny_model_dir, sample_data_dir, out, resume=True, lora_dropout=0.1,
                        eval_data=[str(validation_dir)], **EVAL)
    assert resumed["stopped_by"] == "steps" and resumed["steps"] == 3
    _assert_same_weights(root / "tracked", out)
    assert resumed["loss_curve"] == tracked["loss_curve"]


def test_cli_default_eval_tokens_is_the_library_default():
    from scca_eval.cli.finetune import finetune as command
    from scca_eval.training.recipe import DEFAULT_EVAL_TOKENS

    (option,) = [p for p in command.params if p.name == "eval_tokens"]
    assert option.default == DEFAULT_EVAL_TOKENS
