"""`scca-eval bench`: attention alone per pattern, and whole-model throughput."""

from __future__ import annotations

import click

from ..choices import ATTENTION_BENCH_PATTERNS, PRESETS
from .options import INT_LIST, NAME_LIST, device_option, dtype_option, output_file_callback, rope_scaling_options

ATTENTION_PATTERNS = ",".join(ATTENTION_BENCH_PATTERNS)
MODEL_PATTERNS = ",".join(PRESETS)
# Without a GPU the attention benchmark runs at these lengths, so it finishes in seconds.
CPU_LENGTHS = [512, 1024]


@click.group()
def bench():
    """Benchmarks: attention alone per pattern, and evaluation throughput of a whole model.

    \b
    scca-eval bench attention --n 8192,32768
    scca-eval bench model --shape llama2-7b --ctx 8192,32768 --pattern full,s2,sda --json bench.json
    """


def _write_outputs(result: dict, markdown: str, json_path: str | None, markdown_path: str | None) -> None:
    from ..bench import write_outputs

    write_outputs(result, markdown, json_path, markdown_path, say=click.echo)


def _check_positive(values, option: str, least: int = 1) -> None:
    from ..errors import UserError

    for value in values:
        if value < least:
            raise UserError(f"{option} must be at least {least} (got {value})")


@bench.command("attention")
@click.option("--n", "ns", type=INT_LIST, default=None,
              help="Sequence lengths, comma-separated. Default: 8192,32768 on a GPU; "
                   f"{','.join(map(str, CPU_LENGTHS))} on CPU.")
@click.option("--heads", type=int, default=32, show_default=True, help="Query heads.")
@click.option("--kv-heads", type=int, default=None, help="Key/value heads (grouped-query). Default: --heads.")
@click.option("--head-dim", type=int, default=128, show_default=True, help="Head dimension.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size.")
@click.option("--pattern", "patterns", type=NAME_LIST, default=ATTENTION_PATTERNS, show_default=True,
              help="Patterns, comma-separated: preset names, sda-rN for sda with dilation N.")
@click.option("--backend", "backends", type=NAME_LIST, default="flex,chunked,strided,packed", show_default=True,
              help="Backends to time: flex, chunked, strided (the chunked rules as SDPA on strided views, "
                   "calls spread over CUDA streams), strided-serial (the same on one stream), packed (every "
                   "head's segments in one varlen FlashAttention call), auto (what a model would use).")
@click.option("--mode", "modes", type=NAME_LIST, default="fwd", show_default=True,
              help="fwd (the forward alone, as in evaluation) and/or fwd+bwd (forward and backward to q, k "
                   "and v, as in training), comma-separated.")
@click.option("--write-table", "table_path", type=click.Path(dir_okay=False), default=None,
              callback=output_file_callback, help="Merge the times of flex, chunked, strided and packed per (length, pattern, mode) into "
                   "this backend table (created if absent; times from the same GPU add to those there). "
                   "--attention-backend auto runs the fastest of each case of "
                   "scca_eval/attention/backend_table.json. Needs a CUDA GPU.")
@dtype_option()
@click.option("--repeats", type=int, default=None, help="Timed calls per cell (median). Default: 20 on GPU, 3 on CPU.")
@click.option("--no-check", is_flag=True, help="Skip the comparison with a float32 run of the chunked path.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=output_file_callback,
              help="Write the result as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              callback=output_file_callback,
              help="Write the tables as markdown.")
def attention_command(ns, heads, kv_heads, head_dim, batch, patterns, backends, modes, table_path, dtype, repeats,
                      no_check, json_path, markdown_path):
    """Time each pattern's attention against SDPA full causal attention.

    For each length, pattern and mode: the pattern's share of causal attention's
    FLOPs, the time of each backend, and that time over the ideal time (the share
    times SDPA's causal time in the same mode, measured in the same run). Without a
    GPU it runs on CPU at small lengths, to check the command, not to measure speed.

    \b
    With --write-table, the fastest backend of each case goes into a table that
    --attention-backend auto reads (see docs/architecture.md):
      scca-eval bench attention --heads 9 --kv-heads 3 --head-dim 64 --n 16384 \\
          --mode fwd,fwd+bwd --write-table scca_eval/attention/backend_table.json
    """
    import torch

    from ..attention.auto import MODES
    from ..bench import attention_bench, markdown_attention
    from ..errors import UserError
    from ..models import parse_dtype

    cuda = torch.cuda.is_available()
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise UserError(f"--mode {unknown[0]!r} is not a mode; choose from {', '.join(MODES)}")
    if table_path is not None:
        if not cuda:
            raise UserError("--write-table needs a CUDA GPU: auto reads the table on CUDA only, and CPU "
                            "timings here only check the command")
        from ..attention.auto import read_table

        read_table(table_path)  # a broken table is refused now, not after the measurements
    if not cuda:
        click.echo(f"No CUDA GPU here: running on CPU at N = {ns or CPU_LENGTHS} (timings only check the command).")
    ns = ns or ([8192, 32768] if cuda else CPU_LENGTHS)
    _check_positive(ns, "--n", 2)
    _check_positive([heads, head_dim, batch], "--heads, --head-dim and --batch")
    if kv_heads is not None:
        _check_positive([kv_heads], "--kv-heads")
        if heads % kv_heads:
            from ..errors import UserError

            raise UserError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    device = torch.device("cuda" if cuda else "cpu")
    result = attention_bench(ns, heads, head_dim, patterns, parse_dtype(dtype, device), kv_heads=kv_heads,
                             batch=batch, backends=backends, device=device, modes=modes,
                             repeats=repeats or (20 if cuda else 3), warmup=3 if cuda else 1,
                             check=not no_check, log=click.echo)
    _write_outputs(result, markdown_attention(result), json_path, markdown_path)
    if table_path is not None:
        from ..attention.auto import device_kind, write_table

        written = write_table(table_path, result, device_kind(device))
        click.echo(f"wrote {written} entries into {table_path}")


@bench.command("model")
@click.option("--shape", default="llama2-7b", show_default=True,
              help="llama2-7b, llama2-13b, llama2-70b or smollm2-135m (random weights), a config .json file "
                   "(random weights), or a real model as for `ppl --model`.")
@click.option("--ctx", "ctxs", type=INT_LIST, default="8192,32768", show_default=True,
              help="Window lengths, comma-separated.")
@click.option("--pattern", "patterns", type=NAME_LIST, default=MODEL_PATTERNS, show_default=True,
              help="Patterns, comma-separated (sda-rN for sda with dilation N).")
@click.option("--backend", "backends", type=NAME_LIST, default="auto", show_default=True,
              help="Attention backends for the sparse patterns (auto, packed, strided, chunked, flex, flash, "
                   "reference; auto = the measured choice on a GPU, else packed where it runs, else strided; "
                   "chunked on CPU); full always uses SDPA.")
@click.option("--batch-size", "-b", type=int, default=None,
              help="Windows per forward pass. Default: the engine's automatic choice.")
@click.option("--tokens-per-run", type=int, default=32768, show_default=True,
              help="About this many tokens per timed run (at least one window).")
@click.option("--repeats", type=int, default=2, show_default=True,
              help="Timed runs of each path after one warm-up (two for a compiled engine, whose first run of a "
                   "shape is eager; median); engine and plain take turns.")
@click.option("--no-plain", is_flag=True, help="Skip the plain transformers loop.")
@click.option("--compile", "compile_engine", is_flag=True,
              help="Run the engine compiled, as `ppl --compile` does (the plain loop stays eager).")
@click.option("--layers", type=int, default=None, help="Override the number of layers (quick checks).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Profile one more engine run of each cell: on a GPU its time by kernel class (attention, "
                   "matmul, layout, other) and what that bounds against full attention in a second table; "
                   "each cell's op table in this folder (its first line: how often compiled code was entered, "
                   "and in how many regions).")
@rope_scaling_options()
@dtype_option()
@device_option()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=output_file_callback,
              help="Write the result as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              callback=output_file_callback,
              help="Write the table as markdown.")
def model_command(shape, ctxs, patterns, backends, batch_size, tokens_per_run, repeats, no_plain, compile_engine,
                  layers, profile_dir, rope_scaling, original_ctx, dtype, device, json_path, markdown_path):
    """Evaluation throughput of a whole model, next to a plain transformers loop.

    For each ctx and pattern: forward and scored tokens/s of the engine (the
    default protocol's windows through score_windows) and of
    model(input_ids, labels=...) on the same windows, achieved TFLOP/s and its
    share of a matrix-multiply peak measured in the same run (on a GPU also the
    rate sustained over seconds, at the power limit), and peak memory.
    """
    from ..attention.dispatch import BACKENDS
    from ..bench import markdown_model, model_bench
    from ..errors import UserError
    from ..models import parse_device, parse_dtype

    _check_positive(ctxs, "--ctx", 2)
    _check_positive([tokens_per_run, repeats], "--tokens-per-run and --repeats")
    if batch_size is not None:
        _check_positive([batch_size], "--batch-size")
    if layers is not None:
        _check_positive([layers], "--layers")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise UserError(f"unknown attention backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    device = parse_device(device)
    result = model_bench(shape, ctxs, patterns, batch_size, backends=backends, device=device,
                         dtype=parse_dtype(dtype, device), tokens_per_run=tokens_per_run, repeats=repeats,
                         plain=not no_plain, compile=compile_engine, layers=layers, rope_scaling=rope_scaling,
                         original_ctx=original_ctx, profile_dir=profile_dir, log=click.echo)
    _write_outputs(result, markdown_model(result), json_path, markdown_path)


@bench.command("train")
@click.option("--shape", default="llama2-7b", show_default=True,
              help="llama2-7b, llama2-13b, llama2-70b or smollm2-135m, or a config .json file (random weights).")
@click.option("--ctx", "ctxs", type=INT_LIST, default="8192,32768", show_default=True,
              help="Window lengths, comma-separated.")
@click.option("--pattern", "patterns", type=NAME_LIST, default=MODEL_PATTERNS, show_default=True,
              help="Patterns to fine-tune under, comma-separated (sda-rN for sda with dilation N).")
@click.option("--steps", type=int, default=1, show_default=True, help="Timed steps per cell (median).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Untimed steps per cell first (a compiled cell adds one: its first step runs eagerly).")
@click.option("--no-baseline", is_flag=True, help="Skip the peft + transformers baseline loop.")
@click.option("--compile", "compile_layers", is_flag=True,
              help="Compile the decoder layers for the finetune cells (the baseline stays eager).")
@click.option("--backend", "backends", type=NAME_LIST, default="auto", show_default=True,
              help="Attention backends the sparse patterns train on, one cell each (auto, packed, strided, "
                   "chunked, flex); full always uses SDPA.")
@click.option("--offload-activations", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              is_flag=False, flag_value="on",
              help="Where the finetune cells keep what the backward pass needs, as `finetune "
                   "--offload-activations` (auto: in host memory only where keeping it on the GPU would not fit).")
@click.option("--no-offload-activations", "no_offload", is_flag=True, hidden=True,
              help="The same as --offload-activations off.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute each decoder layer's forward in the backward pass (baseline and finetune cells), "
                   "or keep every activation, as `finetune --no-gradient-checkpointing`. Default: auto, as "
                   "finetune's (decided once, at the largest --ctx).")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Replay the finetune cells' compiled layers as CUDA graphs, as `finetune --cuda-graphs` (implies "
                   "--compile and --no-gradient-checkpointing). Default: auto, as finetune's (decided once, at "
                   "the largest --ctx).")
@click.option("--layers", type=int, default=None, help="Override the number of layers (quick checks).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False), default=None,
              help="Profile one more step of each cell: host and GPU busy time in the table, on a GPU that "
                   "time by kernel class (attention, matmul, layout, other) and what that bounds against full "
                   "attention in a second table; each cell's op table in this folder (its first line: how "
                   "often compiled code was entered, and in how many regions).")
@dtype_option()
@device_option()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Write the table as markdown.")
def train_command(shape, ctxs, patterns, steps, warmup, no_baseline, compile_layers, backends, offload_activations,
                  no_offload, gradient_checkpointing, cuda_graphs, layers, profile_dir, dtype, device, json_path,
                  markdown_path):
    """Fine-tuning step throughput and peak memory, next to the loop a user writes today.

    For each ctx: the baseline (peft + transformers SDPA, model(ids, labels=ids).loss,
    AdamW) and the `scca-eval finetune` step under each pattern (the step finetune's
    auto would take, unless --gradient-checkpointing or --cuda-graphs says otherwise;
    the baseline checkpoints where the finetune cells do), on one random window per step
    of a model with random weights; tokens/s, peak memory, and their ratios to the
    baseline and to full attention.
    """
    from ..attention.dispatch import BACKENDS
    from ..bench.train import markdown_train, train_bench
    from ..errors import UserError
    from ..models import parse_device, parse_dtype
    from .finetune import offload_setting

    _check_positive(ctxs, "--ctx", 2)
    _check_positive([steps], "--steps")
    _check_positive([warmup], "--warmup", 0)
    if layers is not None:
        _check_positive([layers], "--layers")
    unknown = [name for name in backends if name not in BACKENDS or name in ("sdpa", "reference")]
    if unknown:
        raise UserError(f"unknown attention backend {unknown[0]!r} for training; choose from auto, packed, strided, "
                        "chunked, flex, flash")
    device = parse_device(device)
    result = train_bench(shape, ctxs, patterns, device=device, dtype=parse_dtype(dtype, device), steps=steps,
                         warmup=warmup, baseline=not no_baseline, compile=compile_layers,
                         offload_activations=offload_setting("off" if no_offload else offload_activations),
                         backends=backends,
                         gradient_checkpointing="auto" if gradient_checkpointing is None else gradient_checkpointing,
                         cuda_graphs="auto" if cuda_graphs is None else cuda_graphs,
                         layers=layers, profile_dir=profile_dir, log=click.echo)
    _write_outputs(result, markdown_train(result), json_path, markdown_path)
