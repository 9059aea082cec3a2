"""`scca-eval ppl`: evaluate perplexity over tasks × ctx for one or more patterns."""

from __future__ import annotations

import contextlib

import click

from ..choices import LAST_WINDOWS, PROTOCOLS
from ..errors import UserError
from . import launch
from .options import (device_option, dtype_option, ints_callback, model_loading_options, names_callback,
                      paths_callback, pattern_option, pattern_settings_options)
from .sections import SectionedCommand

DEVICE_MAPS = ["auto", "balanced", "balanced_low_0", "sequential"]

HELP_SECTIONS = {
    "What to evaluate": ["model", "tasks", "data", "patterns", "ctx", "max_tokens", "adapter", "merge_adapter",
                         "rope_scaling", "original_ctx", "trainable_params", "tokenizer_path",
                         "trust_remote_code", "allow_long_context"],
    "How it is measured": ["protocol", "stride", "last_window", "add_bos", "chunk_size", "dilation", "dtype", "seed"],
    "Where to write": ["out", "no_write", "save_every", "no_resume", "quiet"],
    "Performance": ["device", "batch_size", "attention_backend", "compile_layers", "gpus", "device_map"],
}


@click.command(cls=SectionedCommand, sections=HELP_SECTIONS)
@model_loading_options(" Also 'longlora': CTX = the largest --ctx.", bare_longlora=True)
@click.option("--task", "-t", "tasks", multiple=True, callback=names_callback,
              help="Task name (a YAML in ./tasks or a bundled one) or a task YAML path; comma-separated "
                   "or repeated. "
                   "Default: pg19_sample and proof_pile_sample.")
@click.option("--data", "data", multiple=True, type=click.Path(), callback=paths_callback,
              help="Evaluate a local file or folder (.txt, .txt.gz, .jsonl, .jsonl.gz, .parquet, LongLoRA .bin) "
                   "without writing a task YAML; comma-separated or repeated.")
@click.option("--ctx", "ctx", multiple=True, default=["1024"], show_default=True, callback=ints_callback,
              metavar="N[,N...]",
              help="Window length(s) in tokens, comma-separated or repeated, e.g. 1024,2048,4096,8192.")
@click.option("--stride", type=int, default=None,
              help="Tokens a window advances, 1..ctx. Default: ctx (disjoint windows). "
                   "Smaller strides give each scored token more context and cost ctx/stride times more. "
                   "With --protocol longlora: the step between window starts (default 256).")
@pattern_option()
@pattern_settings_options
@click.option("--batch-size", "-b", type=int, default=None,
              help="Windows per forward pass. Default: about 8k tokens per batch on CPU, 16k on GPU, and "
                   "no more windows than the task has of full length.")
@click.option("--max-tokens", type=int, default=None,
              help="Cap on scored tokens per task and ctx, for quick looks: equal prefixes of the "
                   "documents, each at least one window long.")
@click.option("--bos/--no-bos", "add_bos", default=False, show_default=True,
              help="Prepend the tokenizer's BOS token to every document (it is context, never scored).")
@dtype_option()
@device_option(processes=True)
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="stride", show_default=True,
              help="stride: per document, every token scored once (see --stride). longlora: LongLoRA's "
                   "eval.py exactly — documents joined into one stream, ctx-token windows every --stride "
                   "tokens (default 256), every token of every window scored, exp(mean window loss). "
                   "lm-eval: lm-evaluation-harness's loglikelihood_rolling token for token, --ctx = its "
                   "max_length (every token scored, the first after lm-eval's prefix token).")
@click.option("--last-window", type=click.Choice(list(LAST_WINDOWS)), default="full", show_default=True,
              help="stride protocol: a document's last window ends at its end and is a full ctx long "
                   "(re-reading scored tokens as context), or short: only the tokens left, as in the "
                   "transformers/YaRN perplexity recipes. Either way every token is scored once.")
@click.option("--compile", "compile_layers", is_flag=True,
              help="Compile the decoder layers and the loss step (fused elementwise kernels). Faster once "
                   "compiled, but compiling takes time per pattern and ctx, so it pays on long runs such as "
                   "sweeps, not on quick looks (benchmarks/README.md has the measurements). Numbers change "
                   "only within float noise.")
@click.option("--allow-long-context", is_flag=True,
              help="Evaluate a ctx beyond what the model's RoPE settings cover (with one warning); without "
                   "it such a ctx is refused, naming a --rope-scaling value that covers it.")
@click.option("--device-map", type=click.Choice(DEVICE_MAPS), default=None,
              help="Spread a model too large for one GPU over the visible GPUs with accelerate (then CPU "
                   "memory if they are full): auto and balanced spread the layers evenly, balanced_low_0 "
                   "keeps GPU 0 light, sequential fills GPU 0 first. Recorded in the record. Not with "
                   "--device or --gpus.")
@launch.gpus_option("Data parallel over N GPUs of this machine: starts N processes through torchrun, "
                    "each scoring whole batches of the windows; rank 0 writes the same records a one-GPU "
                    "run writes. Same as `torchrun --nproc-per-node N -m scca_eval ppl ...`.")
@click.option("--out", "-o", type=click.Path(), default="results/runs", show_default=True,
              help="Folder for the JSON records (one per model, task, pattern and ctx). While a cell "
                   "runs, its progress is saved next to its record (RECORD.json.progress).")
@click.option("--no-write", is_flag=True, help="Do not write result records (and keep no progress).")
@click.option("--save-every", type=int, default=None, metavar="BATCHES",
              help="Save progress after about this many batches of work (also inside a long document), "
                   "and at least every 30 s of scoring and at Ctrl-C. "
                   "Default: 32.")
@click.option("--no-resume", is_flag=True,
              help="Start every cell from the beginning, even when a progress file from a stopped run exists.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap interval.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (for CI logs); the table is still printed.")
def ppl(model, gpus, quiet, no_write, no_resume, compile_layers, **options):
    """Token perplexity of a model on tasks × ctx, under one or more attention patterns.

    Each document is cut into windows of CTX tokens advancing by STRIDE, the last
    one ending at the document's end; every token but the document's first is
    scored once (--protocol lm-eval: lm-eval's rolling windows). One JSON record per
    (model, task, pattern, ctx) goes to --out, and a markdown table is printed.

    A stopped run (Ctrl-C, a killed process, a lost machine) continues where it
    stopped when the same command is run again: finished windows are kept in a
    progress file next to each record, removed once the command has written all
    its records. Ctrl-C exits with status 130, bad input with 2.

    \b
    Examples:
      scca-eval ppl --ctx 1024,2048 --max-tokens 16384
      scca-eval ppl --pattern s2 --pattern longmixed --ctx 8192
      scca-eval ppl --model ./llama-2-7b-longlora-8k --task pg19 --ctx 8192 --rope-scaling linear:2
      scca-eval ppl --model ./llama-2-7b --ctx 8192 --gpus 2
      torchrun --nproc-per-node 2 -m scca_eval ppl --model ./llama-2-7b --ctx 8192
    """
    from .. import distributed
    from ..evaluation.settings import EvalSettings

    # Every cheap check first: bad input fails before a model is loaded or processes start.
    try:
        settings, load_options = EvalSettings.from_options(
            {**options, "out": None if no_write else options["out"], "resume": not no_resume,
             "compile": compile_layers})
        settings.check()
        if settings.device_map is not None:
            _check_device_map(settings.device, gpus)
    except UserError:
        launch.leave_input_errors_to_rank_zero()  # every process checks the same input; rank 0 says it
        raise

    launch.start_processes(gpus, settings.device)

    if settings.device_map is not None and distributed.launched_by_torchrun():
        raise UserError("--device-map cannot be combined with torchrun: each process takes one GPU")
    ranks, device = distributed.setup(settings.device)
    try:
        load_options["tokenizer"] = load_options.pop("tokenizer_path")
        _run(ranks, model, settings, device=device, quiet=quiet,
             load_options={**load_options, "finetuned_ctx": max(settings.ctx)})
    except KeyboardInterrupt as error:
        launch.interrupted(ranks, error)
    except UserError as error:
        launch.rank_error(ranks, error)
    finally:
        distributed.teardown()


def _run(ranks, model: str, settings, *, device, quiet: bool, load_options: dict) -> None:
    """Load the model once (on this process's device), say what the run costs, evaluate every
    cell of ``settings`` and print the table."""
    from ..api import evaluate, run_cost_line
    from ..models import load_model
    from ..report.tables import markdown_tables
    from .progress import RichProgress

    if settings.device_map is not None:
        _need_accelerate()
    loaded = load_model(model, pattern=settings.pattern_specs[0], dtype=settings.dtype, device=device,
                        device_map=settings.device_map, attention_backend=settings.attention_backend,
                        **load_options)
    if ranks.is_main:
        line = run_cost_line(model, loaded, settings)
        if line:
            click.echo(f"scca-eval: {line}", err=True)
    show_bar = ranks.is_main and not quiet
    bar = RichProgress() if show_bar else contextlib.nullcontext(None)
    with bar as progress:
        # Progress files of finished cells are kept until every cell is done, so running a
        # stopped command again does not score its finished cells again.
        records = evaluate(model, settings, loaded=loaded, progress=progress)
    if ranks.is_main:
        click.echo(markdown_tables(records))
        if settings.out is not None:
            click.echo(f"\n{len(records)} record(s) written to {settings.out}/", err=True)


def _check_device_map(device, gpus) -> None:
    if device is not None:
        raise UserError("give either --device or --device-map, not both")
    if gpus is not None:
        raise UserError("give either --gpus (one model copy per GPU) or --device-map (one model over "
                        "several GPUs), not both")


def _need_accelerate() -> None:
    import importlib.util

    from ..errors import MissingDependency

    if importlib.util.find_spec("accelerate") is None:
        raise MissingDependency("accelerate", "gguf", "--device-map")

