"""`scca-eval passkey`: passkey retrieval accuracy by ctx and depth, for one or more patterns."""

from __future__ import annotations

import contextlib

import click

from ..errors import UserError
from .options import (INT_LIST, device_option, dtype_option, model_loading_options, pattern_option,
                      pattern_settings_options)


@click.command()
@model_loading_options(" Also 'longlora': CTX = the largest --ctx.", bare_longlora=True)
@pattern_option()
@click.option("--ctx", "ctx", type=INT_LIST, default="1024", show_default=True,
              help="Prompt lengths in tokens (each prompt fills exactly one window), e.g. 1024,2048,4096,8192.")
@click.option("--trials", type=int, default=10, show_default=True,
              help="Prompts per depth bucket and ctx, each with its own random key and depth.")
@click.option("--depths", type=int, default=5, show_default=True,
              help="Depth buckets: the filler is split into this many equal shares, and the key line is "
                   "put at a random place inside each in turn.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the keys and depths; the same seed gives every pattern and model the same prompts.")
@pattern_settings_options
@click.option("--batch-size", "-b", type=int, default=None,
              help="Prompts per forward pass. Default: about 8k tokens per batch on CPU, 16k on GPU.")
@dtype_option()
@device_option()
@click.option("--allow-long-context", is_flag=True,
              help="Evaluate a ctx beyond what the model's RoPE settings cover (with one warning); without "
                   "it such a ctx is refused, naming a --rope-scaling value that covers it.")
@click.option("--out", "-o", type=click.Path(), default="results/runs", show_default=True,
              help="Folder for the JSON records (one per model, pattern and ctx). A cell whose record is "
                   "already there with the same settings is not run again.")
@click.option("--no-write", is_flag=True, help="Do not write result records.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (for CI logs); the tables are still printed.")
def passkey(patterns, ctx, trials, depths, seed, chunk_size, dilation, attention_backend, batch_size, dtype,
            device, adapter, merge_adapter, rope_scaling, original_ctx, trainable_params, tokenizer_path,
            trust_remote_code, allow_long_context, model, out, no_write, quiet):
    """Passkey retrieval (LongLoRA's test): a five-digit key hidden at a random depth in
    repeated filler text, and the question asking for it; the answer is right when greedy
    decoding gives exactly the key's tokens. Each prompt is exactly CTX tokens long, so
    under a pattern the model sees one full window, as in `ppl`.

    A trial is scored in one forward pass over prompt and key (teacher-forced: the most
    likely token at each answer position must be the next key token), which is what
    greedy decoding decides, without incremental decoding.

    One JSON record per (model, pattern, ctx) goes to --out with the accuracy per depth
    bucket and every trial's key, depth and answer; accuracy tables by ctx and depth are
    printed. `scca-eval table` and `scca-eval plot` (heat maps) read the records.

    \b
    Examples:
      scca-eval passkey --pattern full,s2,longmixed --ctx 1024,4096,8192
      scca-eval passkey --model ./llama-2-7b --adapter ./longlora-8k --rope-scaling longlora:8192 --ctx 8192
      scca-eval plot results/runs --out passkey
    """
    from ..validation import check_out_folder, check_run_options, resolve_patterns

    for option, value in (("--trials", trials), ("--depths", depths)):
        if value < 1:
            raise UserError(f"{option} must be a whole number of at least 1 (got {value})")
    for c in ctx:
        if c < 2:
            raise UserError(f"--ctx must be whole numbers of at least 2 tokens (got {c})")
    check_run_options(batch_size=batch_size)
    check_out_folder(None if no_write else out)
    specs = resolve_patterns(list(patterns) or ["full"], ctx, chunk_size=chunk_size, dilation=dilation)

    from ..models import load_model

    loaded = load_model(model, pattern=specs[0], dtype=dtype, device=device, chunk_size=chunk_size,
                        dilation=dilation, attention_backend=attention_backend, adapter=adapter,
                        merge_adapter=merge_adapter, rope_scaling=rope_scaling, original_ctx=original_ctx,
                        finetuned_ctx=max(ctx), trainable_params=trainable_params, tokenizer=tokenizer_path,
                        trust_remote_code=trust_remote_code)
    from ..evaluation.passkey import run_passkey

    from .progress import RichProgress

    bar = contextlib.nullcontext(None) if quiet else RichProgress()
    log = None if quiet else (lambda line: click.echo(line, err=True))
    with bar as progress:
        records = run_passkey(loaded, model, specs, list(dict.fromkeys(ctx)), trials=trials, depths=depths,
                              seed=seed, batch_size=batch_size, attention_backend=attention_backend,
                              allow_long_context=allow_long_context, out=None if no_write else out,
                              progress=progress, log=log)
    from ..report.passkey import passkey_tables

    click.echo(passkey_tables(records))
    if not no_write:
        click.echo(f"\n{len(records)} record(s) in {out}/", err=True)
