"""`scca-eval ppl`: evaluate perplexity over tasks × ctx for one or more patterns."""

from __future__ import annotations

import contextlib

import click

from ..choices import PROTOCOLS
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
@click.option("--last-window", type=click.Choice(["full", "short"]), default="full", show_default=True,
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
def ppl(tasks, data, ctx, stride, patterns, chunk_size, dilation, attention_backend, batch_size,
        max_tokens, add_bos, dtype, device, adapter, merge_adapter, rope_scaling, allow_long_context,
        model, device_map, gpus, out, no_write, save_every, no_resume, seed, quiet, original_ctx,
        trainable_params, tokenizer_path, trust_remote_code, protocol, last_window, compile_layers):
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
    from ..validation import (check_ctx_and_stride, check_out_folder, check_protocol, check_run_options,
                              resolve_patterns, resolve_tasks)

    # Every cheap check first: bad input fails before a model is loaded or processes start.
    try:
        check_ctx_and_stride(ctx, stride)
        check_protocol(protocol, ctx, stride, last_window=last_window, add_bos=add_bos)
        check_run_options(batch_size=batch_size, max_tokens=max_tokens, save_every=save_every)
        check_out_folder(None if no_write else out)
        specs = resolve_patterns(list(patterns) or ["full"], ctx, chunk_size=chunk_size, dilation=dilation)
        resolve_tasks(tasks, data)
        if device_map is not None:
            _check_device_map(device, gpus)
    except UserError:
        launch.leave_input_errors_to_rank_zero()  # every process checks the same input; rank 0 says it
        raise

    launch.start_processes(gpus, device)

    if device_map is not None and distributed.launched_by_torchrun():
        raise UserError("--device-map cannot be combined with torchrun: each process takes one GPU")
    ranks, device = distributed.setup(device)
    try:
        _run(ranks, model=model, tasks=tasks, data=data, ctx=ctx, stride=stride, specs=specs,
             attention_backend=attention_backend,
             batch_size=batch_size, max_tokens=max_tokens, add_bos=add_bos, dtype=dtype, device=device,
             device_map=device_map, adapter=adapter, merge_adapter=merge_adapter, rope_scaling=rope_scaling,
             allow_long_context=allow_long_context, out=None if no_write else out, save_every=save_every,
             resume=not no_resume, seed=seed, quiet=quiet, protocol=protocol, last_window=last_window,
             compile=compile_layers,
             model_options={"original_ctx": original_ctx, "trainable_params": trainable_params,
                            "tokenizer": tokenizer_path, "trust_remote_code": trust_remote_code,
                            "finetuned_ctx": max(ctx)})
    except KeyboardInterrupt as error:
        launch.interrupted(ranks, error)
    except UserError as error:
        launch.rank_error(ranks, error)
    finally:
        distributed.teardown()


def _run(ranks, *, model, specs, out, quiet, device, device_map, adapter, merge_adapter, rope_scaling,
         model_options, attention_backend, dtype, **options):
    from ..api import evaluate
    from ..models import load_model
    from ..report.tables import markdown_tables
    from ..evaluation.resume import remove_progress
    from .progress import RichProgress

    if device_map is not None:
        _need_accelerate()
    loaded = load_model(
        model, pattern=specs[0], dtype=dtype, device=device, device_map=device_map,
        attention_backend=attention_backend, adapter=adapter, merge_adapter=merge_adapter,
        rope_scaling=rope_scaling, **model_options,
    )
    if ranks.is_main:
        from ..api import run_cost_line

        line = run_cost_line(model, loaded, specs, tasks=options["tasks"], data=options["data"], ctx=options["ctx"],
                             max_tokens=options["max_tokens"], protocol=options["protocol"],
                             add_bos=options["add_bos"])
        if line:
            click.echo(f"scca-eval: {line}", err=True)
    records = []
    show_bar = ranks.is_main and not quiet
    bar = RichProgress() if show_bar else contextlib.nullcontext(None)
    with bar as progress:
        for spec in specs:
            records += evaluate(
                model, pattern=spec, out=out, device_map=device_map,
                loaded=loaded, progress=progress, attention_backend=attention_backend, keep_progress=True,
                **options,
            )
    # Progress files of finished cells are kept until every pattern is done, so running a
    # stopped command again does not score its finished cells again.
    if ranks.is_main:
        remove_progress(records)
        click.echo(markdown_tables(records))
        if out is not None:
            click.echo(f"\n{len(records)} record(s) written to {out}/", err=True)


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

