"""`scca-eval sweep`: models × tasks × patterns × ctx, one record per cell, resumable."""

from __future__ import annotations

import contextlib

import click

from ..choices import LAST_WINDOWS
from .options import (attention_backend_option, device_option, dtype_option, ints_callback, names_callback,
                      paths_callback, pattern_option, pattern_size_options, rope_scaling_options)
from .sections import SectionedCommand

HELP_SECTIONS = {
    "What to evaluate": ["models", "tasks", "data", "patterns", "ctx", "max_tokens", "adapter", "rope_scaling",
                         "original_ctx", "allow_long_context"],
    "How it is measured": ["stride", "last_window", "add_bos", "chunk_size", "dilation", "dtype", "seed"],
    "Where to write": ["out", "dry_run", "quiet"],
    "Performance": ["device", "batch_size", "attention_backend", "compile_engine"],
}


@click.command(cls=SectionedCommand, sections=HELP_SECTIONS)
@click.argument("sweep_file", required=False, type=click.Path())
@click.option("--model", "-m", "models", multiple=True, callback=paths_callback,
              help="Model: 'default', a model folder, a .gguf file or a hub id; comma-separated or repeated. "
                   "Default: default.")
@pattern_option()
@click.option("--ctx", multiple=True, callback=ints_callback, metavar="N[,N...]",
              help="Window lengths, comma-separated or repeated, e.g. 1024,2048,4096,8192. Default: 1024.")
@click.option("--task", "-t", "tasks", multiple=True, callback=names_callback,
              help="Task name or task YAML path; comma-separated or repeated. Default: pg19_sample and "
                   "proof_pile_sample.")
@click.option("--data", "data", multiple=True, type=click.Path(), callback=paths_callback,
              help="A local file or folder evaluated as a task; comma-separated or repeated.")
@click.option("--stride", type=int, default=None, help="Tokens a window advances, 1..ctx. Default: ctx.")
@click.option("--last-window", type=click.Choice(LAST_WINDOWS), default=None,
              help="A document's last window: full (ends at the document's end, a full ctx long) or short "
                   "(only the tokens left), as `ppl --last-window`. Default: full.")
@click.option("--max-tokens", type=int, default=None,
              help="Cap on scored tokens per cell (equal document prefixes), the same for every cell.")
@click.option("--batch-size", "-b", type=int, default=None, help="Windows per forward pass. Default: automatic.")
@dtype_option()
@device_option()
@pattern_size_options()
@click.option("--bos/--no-bos", "add_bos", default=None, help="Prepend BOS to every document. Default: no.")
@click.option("--allow-long-context", is_flag=True, default=None,
              help="Evaluate a ctx beyond what the model's RoPE settings cover (with one warning).")
@attention_backend_option(default=None)
@click.option("--adapter", type=click.Path(), default=None,
              help="LoRA adapter folder for every model of the sweep (a model's own in the sweep file wins).")
@rope_scaling_options(" For every model; a model's own in the sweep file wins.")
@click.option("--seed", type=int, default=None, help="Seed of the bootstrap interval. Default: 0.")
@click.option("--compile", "compile_engine", is_flag=True, default=None,
              help="Compile each model's decoder layers and loss step, as `ppl --compile` does.")
@click.option("--out", "-o", type=click.Path(), default=None,
              help="Folder for the records. Default: results/sweep.")
@click.option("--dry-run", is_flag=True, help="List the cells and exit without loading anything.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no per-cell lines (for CI logs).")
def sweep(sweep_file, models, adapter, rope_scaling, original_ctx, compile_engine, dry_run, quiet, **options):
    """Evaluate the grid models × tasks × patterns × ctx, writing one record per cell as
    soon as it is done. Cells whose record already exists in --out with the same
    configuration (model weights, task data, tokenizer, pattern settings, ctx, stride,
    protocol, --max-tokens, BOS, dtype, seed) are skipped, so an interrupted sweep resumes
    where it stopped when run again. A table of every cell is printed at the end.

    SWEEP_FILE is an optional YAML file with the same settings (models, patterns, ctx,
    tasks, data, out, stride, max_tokens, ...); options given here override it.

    \b
    Examples:
      scca-eval sweep --pattern full,s2,scca_fixed,scca_flow,sda,longmixed \\
          --ctx 1024,2048,4096,8192 --max-tokens 16384 --out results/smollm2-135m
      scca-eval sweep results/smollm2-135m.yaml --device cuda
    """
    from ..report.tables import markdown_tables
    from ..evaluation.sweep import ModelEntry, load_sweep_file, make_sweep, run_sweep
    from ..models.rope import check_original_ctx

    settings = load_sweep_file(sweep_file) if sweep_file else {}
    # The options name the sweep file's settings (EvalSettings fields); given ones override the file.
    given = {**options, "models": models, "compile": compile_engine}
    settings.update({key: list(value) if isinstance(value, tuple) else value
                     for key, value in given.items() if value is not None and value not in ((), [])})
    plan = make_sweep(settings, where=sweep_file or "sweep")
    per_model = (("adapter", adapter), ("rope_scaling", rope_scaling), ("original_ctx", original_ctx))
    shared = {key: value for key, value in per_model if value}
    if shared:
        plan.models = [ModelEntry(m.model, tuple(sorted({**shared, **dict(m.options)}.items())))
                       for m in plan.models]
    for entry in plan.models:  # before any model runs: a later model's mistake would stop the sweep part-way
        options = dict(entry.options)
        check_original_ctx(options.get("original_ctx"), options.get("rope_scaling"), options.get("adapter"),
                           entry.model)

    cells = plan.cell_labels()
    if dry_run:
        click.echo("\n".join(cells))
        click.echo(f"{len(cells)} cell(s); records go to {plan.out}/; {plan.settings_line()}", err=True)
        return

    from .progress import RichProgress

    log = None if quiet else (lambda line: click.echo(line, err=True))
    bar = contextlib.nullcontext(None) if quiet else RichProgress()
    with bar as progress:
        result = run_sweep(plan, progress=progress, log=log)
    click.echo(markdown_tables(result.records))
    click.echo(f"\n{len(result.records)} cell(s): {result.computed} computed, {result.reused} already in "
               f"{plan.out}/", err=True)
