"""`scca-eval finetune`: LoRA fine-tuning under an attention pattern (LongLoRA's recipe)."""

from __future__ import annotations

from pathlib import Path

import click

from . import launch
from .options import (device_option, dtype_option, model_option, names_callback, paths_callback, pattern_option,
                      pattern_settings_options, rope_scaling_options)

_LL = "LongLoRA's fine-tune.py"
_LL_README = "LongLoRA's README command"
_HF = "transformers' Trainer default, as LongLoRA's run used"


def offload_setting(text: str) -> bool | str:
    """--offload-activations auto|on|off -> the recipe's "auto", True or False."""
    return {"on": True, "off": False}.get(text, text)


@click.command()
@model_option(role="Base model: ")
@pattern_option(several=False, purpose=" Training runs under it, with the same kernels ppl evaluates with.")
@click.option("--ctx", type=int, required=True, help="Training window length in tokens.")
@click.option("--out", "-o", type=click.Path(), required=True,
              help="Folder for the adapter, trainable_params.bin, training.json and checkpoint.pt: "
                   "a folder of the run's own (not the model's folder, nor inside --data).")
@rope_scaling_options(" Also 'longlora': CTX = --ctx, the rule of LongLoRA's fine-tune.py. ppl --adapter "
                      "applies the scaling a run was trained with.", bare_longlora=True)
@click.option("--task", "-t", "tasks", multiple=True, callback=names_callback,
              help="Training task (a YAML in ./tasks, a bundled one, or a YAML path); comma-separated or "
                   "repeated. "
                   "Default: pg19_train and proof_pile_train (bundled, disjoint from the evaluation samples).")
@click.option("--data", "data", multiple=True, type=click.Path(), callback=paths_callback,
              help="Train on a local file or folder (.txt, .jsonl, .jsonl.gz, .parquet, LongLoRA .bin); "
                   "comma-separated or repeated.")
@click.option("--steps", type=int, default=1000, show_default=True, help=f"Optimizer steps ({_LL_README}).")
@click.option("--max-time", type=float, default=None, metavar="SECONDS",
              help="Stop at the first step boundary after this much training time (the steps alone, over every "
                   "resumed part; validation not counted), even before --steps; training.json says stopped_by "
                   "max_time. For runs matched in compute.")
@click.option("--eval-task", "eval_tasks", multiple=True, callback=names_callback,
              help="Validation text, as --task takes it (comma-separated or repeated): its loss with full "
                   "attention, over fixed ctx-token windows, before the first step, every --eval-every steps "
                   "and after the last; in training.json (validation, convergence) and the progress line.")
@click.option("--eval-data", "eval_data", multiple=True, type=click.Path(), callback=paths_callback,
              help="Validation text from a local file or folder, as --data takes it.")
@click.option("--eval-every", type=int, default=None, metavar="STEPS",
              help="Measure the validation loss every this many steps (needs --eval-task or --eval-data; "
                   "without it, only before the first step and after the last).")
@click.option("--eval-tokens", type=int, default=131_072, show_default=True,  # training.recipe.DEFAULT_EVAL_TOKENS
              help="Validation windows: this many tokens // --ctx windows (at least one), spread evenly over the "
                   "validation text; the same windows at every point.")
@click.option("--log-dir", type=click.Path(), default=None,
              help="Write TensorBoard event files here (training loss, lr, gradient norm, tokens/s, validation "
                   "loss); needs the tensorboard package (pip install 'scca-eval[tensorboard]').")
@click.option("--batch-size", "-b", type=int, default=1, show_default=True,
              help=f"Windows per forward/backward pass ({_LL_README}: 1 per GPU).")
@click.option("--grad-accum", type=int, default=None,
              help=f"Passes per optimizer step. Default: 8 ({_LL_README}; its 8 GPUs made 64 windows a step).")
@click.option("--tokens-per-step", type=int, default=None,
              help="Tokens per optimizer step instead of --grad-accum: a multiple of --batch-size x --ctx.")
@click.option("--lr", type=float, default=2e-5, show_default=True, help=f"Peak learning rate ({_LL_README}).")
@click.option("--warmup-steps", type=int, default=20, show_default=True,
              help=f"Linear warm-up steps, then a constant rate ({_LL_README}: constant_with_warmup).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True, help=f"AdamW weight decay ({_LL_README}).")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True,
              help=f"Gradient clipping, 0 for none ({_HF}).")
@click.option("--seed", type=int, default=42, show_default=True,
              help=f"Seed of the LoRA initialization and the window order ({_HF}).")
@click.option("--lora-rank", type=int, default=8, show_default=True, help=f"LoRA rank r ({_LL}).")
@click.option("--lora-alpha", type=float, default=16.0, show_default=True, help=f"LoRA alpha ({_LL}).")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True, help=f"LoRA dropout ({_LL}).")
@click.option("--lora-targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True,
              help=f"Linear layers that get LoRA, comma-separated ({_LL}).")
@click.option("--trainable", default="embed,norm", show_default=True,
              help=f"Other weights trained in full: parameters whose names contain one of these ({_LL}); "
                   "'none' for LoRA only. Saved to trainable_params.bin.")
@dtype_option("Dtype of the frozen weights; trained weights stay float32 under autocast.")
@device_option(processes=True)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help=f"Recompute each decoder layer in the backward pass to save memory ({_LL}). Default: auto, "
                   "checkpointed unless the step with CUDA graphs is taken (see --cuda-graphs).")
@click.option("--compile", "compile_layers", is_flag=True,
              help="Compile the decoder layers (torch.compile; fused elementwise kernels).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="On a CUDA GPU, keep every activation (no checkpointing) and replay each compiled decoder "
                   "layer as a CUDA graph (torch.compile's reduce-overhead mode): the host launches one graph "
                   "instead of every kernel. Implies --compile and --no-gradient-checkpointing. Default: auto, "
                   "taken on one CUDA GPU where forward probes on short windows predict that every activation "
                   "fits in half the GPU memory at hand (or of --max-memory); otherwise the checkpointed step.")
@click.option("--offload-activations", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              is_flag=False, flag_value="on",
              help="On a GPU, keep what the backward pass needs (under --gradient-checkpointing: each decoder "
                   "layer's input, memory that grows with ctx x layers) in pinned host memory, for a copy each "
                   "way. auto: the first pass runs offloaded and measures what keeping would need (saved "
                   "activations, the pass's peak, the optimizer state to come); later passes keep them on the "
                   "GPU where that fits the free GPU memory (or --max-memory). Off a GPU nothing is offloaded.")
@click.option("--no-offload-activations", "no_offload", is_flag=True, hidden=True,
              help="The same as --offload-activations off.")
@click.option("--max-memory", "max_memory_gib", type=float, default=None, metavar="GIB",
              help="GPU memory in GiB that --offload-activations auto and --cuda-graphs auto may plan with. "
                   "Default: what the GPU has.")
@click.option("--save-every", type=int, default=50, show_default=True, metavar="STEPS",
              help="Write checkpoint.pt (atomically) every this many steps, and at the end.")
@click.option("--resume", is_flag=True,
              help="Continue the run whose checkpoint.pt is in --out (same options; --steps may grow).")
@click.option("--keep-checkpoint", is_flag=True,
              help="Keep checkpoint.pt (trainable weights and optimizer state) when the run finishes, to extend "
                   "it later with --resume and more --steps; without it a finished run removes it.")
@pattern_settings_options
@click.option("--allow-long-context", is_flag=True,
              help="Train at a ctx beyond the model's trained length without position interpolation.")
@launch.gpus_option("Data parallel over N GPUs of this machine: N processes (torchrun) share the passes of "
                    "every step (--grad-accum a multiple of N) and sum their gradients; rank 0 writes. Same as "
                    "`torchrun --nproc-per-node N -m scca_eval finetune ...`.")
@click.option("--shard/--replicate", "shard", default=False, show_default=True,
              help="How the N processes of --gpus N (or torchrun) hold the model: --replicate gives each a whole "
                   "copy; --shard splits every weight, gradient and AdamW moment over them (FSDP2), for a model "
                   "too large for one GPU. Same files, same weights within float tolerance.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def finetune(model, gpus, quiet, compile_layers, cuda_graphs, offload_activations, no_offload, **options):
    """LoRA fine-tuning under an attention pattern, with LongLoRA's recipe.

    Trains LoRA on the attention projections plus the embeddings and norms of MODEL on
    CTX-token windows of the training text, with attention under PATTERN. --out then
    holds a peft adapter that `scca-eval ppl --adapter OUT` evaluates (with the RoPE
    scaling it was trained with), LongLoRA's trainable_params.bin, and training.json
    (base model fingerprint, pattern, data, recipe, loss curve, speed, memory). With
    --eval-task, the validation loss under full attention is measured as the run goes and
    training.json says whether it has flattened (docs/finetune.md, "Validation").

    A stopped run continues with --resume: Ctrl-C saves the last finished step and exits
    with 130; after a kill, the last checkpoint (every --save-every steps) is kept. Bad
    input exits with 2.

    \b
    Examples:
      scca-eval finetune --pattern longmixed --ctx 16384 --rope-scaling linear:2 --steps 200 --out ckpt/longmixed
      scca-eval ppl --adapter ckpt/longmixed --ctx 16384
      scca-eval finetune --model ./Llama-2-7b-hf --pattern s2 --ctx 8192 --rope-scaling longlora --out ckpt/s2
      scca-eval finetune --model ./Llama-2-70b-hf --ctx 8192 --rope-scaling longlora --gpus 8 --shard --out ckpt/70b
      scca-eval finetune --pattern s2 --ctx 16384 --rope-scaling linear:2 --eval-task pg19_sample --eval-every 50 --out ckpt/s2
    """
    from .. import distributed
    from ..errors import UserError
    from ..training import finetune as run_finetune
    from ..training.settings import TrainSettings
    from .training_progress import TrainingBar

    # Every cheap check first: bad input fails before a model is loaded or processes start.
    try:
        settings = TrainSettings.from_options(
            {**options, "compile": compile_layers or cuda_graphs is True,
             "cuda_graphs": "auto" if cuda_graphs is None else cuda_graphs,
             "offload_activations": offload_setting("off" if no_offload else offload_activations)})
        settings.check()
    except UserError:
        launch.leave_input_errors_to_rank_zero()  # every process checks the same input; rank 0 says it
        raise

    launch.start_processes(gpus, settings.device)
    ranks, device = distributed.setup(settings.device)
    try:
        record = run_finetune(model, settings.on_device(device),
                              progress=None if quiet or not ranks.is_main else TrainingBar())
    except UserError:
        launch.leave_input_errors_to_rank_zero()  # every rank meets the same bad input; rank 0 says it
        raise
    finally:
        distributed.teardown()
    if not ranks.is_main:
        return
    ctx, out = settings.ctx, settings.out
    runtime = record["runtime"]
    loss = record["loss_curve"][-1] if record["loss_curve"] else float("nan")
    click.echo(f"trained {record['steps']} steps ({record['tokens_seen']:,} tokens) under {record['pattern_name']} "
               f"at ctx {ctx}: final loss {loss:.4f}, {runtime['tokens_per_second'] or 0:,.0f} tokens/s")
    checkpoint = Path(out) / "checkpoint.pt"
    if checkpoint.exists():
        click.echo(f"{checkpoint} ({checkpoint.stat().st_size / 2**20:,.0f} MiB) is kept: --resume with more --steps "
                   "extends the run; delete it when done", err=True)
    if record["stopped_by"] == "max_time":
        click.echo(f"stopped by --max-time {settings.recipe.max_time:g}: {runtime['seconds']:.1f} s of training")
    if record["validation"] and record["validation"]["curve"]:
        point, rule = record["validation"]["curve"][-1], record["convergence"]
        verdict = ("not judged: " + rule["reason"] if rule["converged"] is None else
                   f"{rule['direction']} over the last tenth ({rule['change']:+.4f} ± {2 * rule['standard_error']:.4f})")
        click.echo(f"validation loss (full attention) at step {point['step']}: {point['loss']:.4f}; {verdict}")
    click.echo(f"adapter written to {out}/ — evaluate it with: scca-eval ppl --model {model} --adapter {out} "
               f"--ctx {ctx}", err=True)
