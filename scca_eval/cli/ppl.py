"""`scca-eval ppl`: evaluate perplexity over tasks × ctx for one or more patterns."""

from __future__ import annotations

import contextlib

import click

from .options import INT_LIST

CHOICE_DTYPES = click.Choice(["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"], case_sensitive=False)


@click.command()
@click.option("--model", "-m", default="default", show_default=True,
              help="'default' (embedded SmolLM2-135M), a Hugging Face model folder or hub id "
                   "(offline: from the local cache), or a .gguf file.")
@click.option("--task", "-t", "tasks", multiple=True,
              help="Task name (a YAML in ./tasks or a bundled one) or a task YAML path; repeatable. "
                   "Default: pg19_sample and proof_pile_sample.")
@click.option("--data", "data", multiple=True, type=click.Path(),
              help="Evaluate a local file or folder (.txt, .jsonl, .jsonl.gz, .parquet, LongLoRA .bin) "
                   "without writing a task YAML; repeatable.")
@click.option("--ctx", "ctx", type=INT_LIST, default="1024", show_default=True,
              help="Window length(s) in tokens, comma-separated, e.g. 1024,2048,4096,8192.")
@click.option("--stride", type=int, default=None,
              help="Tokens a window advances, 1..ctx. Default: ctx (disjoint windows). "
                   "Smaller strides give each scored token more context and cost ctx/stride times more.")
@click.option("--pattern", "-p", "patterns", multiple=True,
              help="Attention pattern: full, s2, scca_fixed, scca_flow, sda, longmixed, or a custom mix "
                   "such as '1/2 local + 1/2 cross(1)' (see `scca-eval patterns list`); repeatable. "
                   "Default: full.")
@click.option("--chunk-size", type=int, default=None,
              help="Chunk size G in tokens for the chunked rules. Default: a quarter of the window.")
@click.option("--dilation", type=int, default=None, help="Dilation r of the sda pattern. Default: 2.")
@click.option("--attention-backend",
              type=click.Choice(["auto", "strided", "chunked", "flex", "reference", "flash"]),
              default="auto", show_default=True,
              help="Kernel for sparse patterns: auto = strided SDPA layout on GPU, chunked on CPU.")
@click.option("--batch-size", "-b", type=int, default=None,
              help="Windows per forward pass. Default: about 8k tokens per batch on CPU, 16k on GPU.")
@click.option("--max-tokens", type=int, default=None,
              help="Cap on scored tokens per task and ctx, for quick looks: equal prefixes of the "
                   "documents, each at least one window long.")
@click.option("--bos/--no-bos", "add_bos", default=False, show_default=True,
              help="Prepend the tokenizer's BOS token to every document (it is context, never scored).")
@click.option("--dtype", type=CHOICE_DTYPES, default=None,
              help="Compute dtype. Default: float32 on CPU, bfloat16 on GPU.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N. Default: cuda if available.")
@click.option("--adapter", type=click.Path(), default=None,
              help="LoRA adapter folder (peft); LongLoRA's trainable_params.bin in it is loaded too.")
@click.option("--merge-adapter", is_flag=True, help="Merge the adapter into the weights before evaluating (faster).")
@click.option("--rope-scaling", default=None,
              help="Position interpolation: 'linear:F' (factor F) or 'longlora:CTX' "
                   "(F = ceil(CTX / the model's original length)).")
@click.option("--allow-long-context", is_flag=True,
              help="Evaluate a ctx beyond the model's trained length (without position interpolation).")
@click.option("--out", "-o", type=click.Path(), default="results/runs", show_default=True,
              help="Folder for the JSON records (one per model, task, pattern and ctx).")
@click.option("--no-write", is_flag=True, help="Do not write result records.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap interval.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (for CI logs); the table is still printed.")
def ppl(tasks, data, ctx, stride, patterns, chunk_size, dilation, attention_backend, batch_size,
        max_tokens, add_bos, dtype, device, adapter, merge_adapter, rope_scaling, allow_long_context,
        model, out, no_write, seed, quiet):
    """Token perplexity of a model on tasks × ctx, under one or more attention patterns.

    Each document is cut into windows of CTX tokens advancing by STRIDE; every
    token but the document's first is scored once. One JSON record per
    (model, task, pattern, ctx) goes to --out, and a markdown table is printed.

    \b
    Examples:
      scca-eval ppl --ctx 1024,2048 --max-tokens 16384
      scca-eval ppl --pattern s2 --pattern longmixed --ctx 8192
      scca-eval ppl --model ./llama-2-7b-longlora-8k --task pg19 --ctx 8192 --rope-scaling linear:2
    """
    from ..api import evaluate
    from ..models import load_model
    from ..patterns.parse import resolve_pattern
    from ..results import markdown_tables
    from .progress import RichProgress

    patterns = list(patterns) or ["full"]
    specs = [resolve_pattern(p, chunk_size=chunk_size, dilation=dilation) for p in patterns]
    loaded = load_model(
        model, pattern=specs[0], dtype=dtype, device=device, chunk_size=chunk_size, dilation=dilation,
        attention_backend=attention_backend, adapter=adapter, merge_adapter=merge_adapter,
        rope_scaling=rope_scaling,
    )
    records = []
    bar = contextlib.nullcontext(None) if quiet else RichProgress()
    with bar as progress:
        for spec in specs:
            records += evaluate(
                model, tasks, ctx, stride, spec, data=data, batch_size=batch_size,
                max_tokens=max_tokens, out=None if no_write else out, chunk_size=chunk_size,
                dilation=dilation, add_bos=add_bos, allow_long_context=allow_long_context,
                seed=seed, loaded=loaded, progress=progress, attention_backend=attention_backend,
            )
    click.echo(markdown_tables(records))
    if not no_write:
        click.echo(f"\n{len(records)} record(s) written to {out}/", err=True)
