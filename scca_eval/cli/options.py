"""The options the commands share, each defined once, and the one list syntax of every option
that takes several values: items separated by commas (a comma inside a rule's parentheses,
as in ``dilated(2,0)``, belongs to the rule), and the option may be repeated.

Option groups (decorators): :func:`model_loading_options` (or its parts :func:`model_option`,
:data:`adapter_options`, :func:`rope_scaling_options`, :data:`checkpoint_options`),
:func:`dtype_option`, :func:`device_option`, :func:`pattern_option`, and
:func:`pattern_settings_options` (:func:`pattern_size_options` and
:func:`attention_backend_option`). ``bench``'s --pattern is its own: benchmark labels such as
``sda-r4`` stand for a pattern and its dilation, and there is no --chunk-size. ``--gpus`` is in
``launch.py``.
"""

from __future__ import annotations

import os

import click

from ..choices import ATTENTION_BACKENDS, DEFAULT_DILATION, DTYPES, PRESETS
from ..evaluation.sweep import split_patterns as split_items

LIST_SYNTAX = "comma-separated or repeated"


def names_callback(ctx, param, values) -> list[str]:
    """A repeatable option's values split into items: ``-p full,s2 -p sda`` -> 3 names. A value
    with no item in it (``-p ''``) is passed on as it is, for its own error message."""
    return [item for value in values or () for item in (split_items([value]) or [value])]


def paths_callback(ctx, param, values) -> list[str]:
    """Like :func:`names_callback`, except that an existing path is never split (a file name
    may hold a comma)."""
    out = []
    for value in values or ():
        out += [value] if os.path.exists(value) else split_items([value])
    return out


def output_file_callback(ctx, param, value):
    """An output file option, checked when the command line is read, before any work: not a
    folder, not under a file, and in a folder where files can be made."""
    if value is None:
        return value
    from pathlib import Path

    from ..files import check_output_path, check_writable_folder

    check_output_path(value)
    check_writable_folder(Path(value).parent, label=f"{param.opts[-1]} {value}")
    return value


def ints_callback(ctx, param, values) -> list[int] | None:
    """Whole numbers, comma-separated or repeated: ``--ctx 1024,2048 --ctx 4096``."""
    if not values:
        return None
    if any(not split_items([value]) for value in values):
        raise click.BadParameter("give at least one number", ctx, param)
    numbers = []
    for item in split_items(values):
        try:
            numbers.append(int(item))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a whole number; give whole numbers such as 1024,2048, "
                                     "or repeat the option", ctx, param) from None
    return numbers


class IntList(click.ParamType):
    """A comma-separated list of whole numbers, e.g. 1024,2048,4096."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of whole numbers (e.g. 1024,2048)", param, ctx)
        if not numbers:
            self.fail("give at least one number", param, ctx)
        return numbers


class NameList(click.ParamType):
    """A comma-separated list of names, e.g. full,s2,longmixed."""

    name = "NAME[,NAME...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        names = [p.strip() for p in str(value).split(",") if p.strip()]
        if not names:
            self.fail("give at least one name", param, ctx)
        return names


INT_LIST = IntList()
NAME_LIST = NameList()


ROPE_SCALING_HELP = (
    "RoPE scaling, as transformers' rope_parameters: 'linear:F' (position interpolation), "
    "'dynamic:F' (dynamic NTK), 'yarn:F' or 'llama3:F' (from the original length L to F x L; "
    "options after commas, e.g. yarn:4,beta_fast=32,beta_slow=1,attention_factor=1.1 or "
    "llama3:8,low_freq_factor=1,high_freq_factor=4), 'longlora:CTX' (linear with F = ceil(CTX / L), "
    "CTX = the fine-tuned length), or 'none'. Default: the checkpoint's own (the record says which)."
)
ORIGINAL_CTX_HELP = ("The original context length L for --rope-scaling yarn, llama3 and longlora "
                     "(default: the config's max_position_embeddings).")


def rope_scaling_options(extra_help: str = "", bare_longlora: bool = False, original_ctx: bool = True):
    """``--rope-scaling`` and ``--original-ctx`` for any command that loads a model.

    The value is checked when the command line is read (one line, exit 2, before anything
    loads) and passed on as written, for ``load_model(rope_scaling=..., original_ctx=...)``.
    ``bare_longlora``: the command fills in ``longlora``'s CTX itself (``ppl``: the largest ctx).
    ``original_ctx=False``: no ``--original-ctx`` (the command cannot pass it on).
    """

    def check(_ctx, _param, value):
        from ..models.rope import parse_rope_scaling

        if value is not None and not (bare_longlora and value.strip().lower() == "longlora"):
            parse_rope_scaling(value)
        return value

    def decorate(command):
        if original_ctx:
            command = click.option("--original-ctx", type=click.IntRange(min=1), default=None, metavar="L",
                                   help=ORIGINAL_CTX_HELP)(command)
        return click.option("--rope-scaling", default=None, callback=check,
                            help=ROPE_SCALING_HELP + extra_help)(command)

    return decorate


def _stack(*options):
    """The options as one decorator, listed in --help in the order given."""

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


# ---------------------------------------------------------------- option groups
# Each group is the one definition of its options: the same names, types and choices in
# every command that has them. A parameter is there only where a command's help must
# differ for a reason (what the option means in that command).

MODEL_HELP = ("'default' (embedded SmolLM2-135M), a Hugging Face model folder or hub id "
              "(offline: from the local cache), or a .gguf file.")


def model_option(role: str = ""):
    """``--model``/``-m`` (one model). ``role`` goes in front of the help ("Base model: ")."""
    return click.option("--model", "-m", default="default", show_default=True, help=role + MODEL_HELP)


adapter_options = _stack(
    click.option("--adapter", type=click.Path(), default=None,
                 help="LoRA adapter folder (peft); LongLoRA's trainable_params.bin in it is loaded too. "
                      "A --model folder that holds an adapter itself is refused: give the adapter here."),
    click.option("--merge-adapter", is_flag=True,
                 help="Merge the adapter into the weights before evaluating (faster)."),
)
adapter_options.__doc__ = "--adapter and --merge-adapter: a LoRA adapter on the model."

checkpoint_options = _stack(
    click.option("--trainable-params", type=click.Path(), default=None,
                 help="LongLoRA's trainable_params.bin (embedding and norm weights) when it is not in the "
                      "adapter folder; loaded with torch.load(weights_only=True)."),
    click.option("--tokenizer", "tokenizer_path", default=None,
                 help="Tokenizer folder or hub id, for checkpoints saved without one. Default: the model's."),
    click.option("--trust-remote-code", is_flag=True,
                 help="Run code shipped with the model (never done unless you give this flag)."),
)
checkpoint_options.__doc__ = ("--trainable-params, --tokenizer and --trust-remote-code: the files of a "
                              "checkpoint beside its weights, and whether its own code may run.")


def model_loading_options(rope_extra_help: str = "", bare_longlora: bool = False):
    """Every option of ``load_model`` a command that evaluates one model takes: --model,
    --adapter, --merge-adapter, --rope-scaling, --original-ctx, --trainable-params,
    --tokenizer and --trust-remote-code (ppl, passkey)."""
    return _stack(model_option(), adapter_options,
                  rope_scaling_options(rope_extra_help, bare_longlora=bare_longlora), checkpoint_options)


def dtype_option(what: str = "Compute dtype."):
    """``--dtype``: one of choices.DTYPES (case-insensitive); ``what`` says what it sets."""
    return click.option("--dtype", type=click.Choice(list(DTYPES), case_sensitive=False), default=None,
                        help=f"{what} Default: float32 on CPU, bfloat16 on GPU.")


DEVICE_HELP = "cpu, cuda or cuda:N. Default: cuda if available."


def device_option(processes: bool = False):
    """``--device``. ``processes``: the command runs under ``--gpus``/torchrun too, and the help
    says which device each process takes."""
    extra = (" With --gpus or torchrun: cpu (gloo) or cuda (each process takes cuda:LOCAL_RANK)."
             if processes else "")
    return click.option("--device", default=None, help=DEVICE_HELP + extra)


def pattern_help(several: bool = True) -> str:
    """What --pattern takes: the presets of choices.py or a custom mix."""
    names = ", ".join(PRESETS[:-1]) + f", {PRESETS[-1]}"
    return (f"{'Attention pattern(s)' if several else 'Attention pattern'}: {names}, or a custom mix such as "
            "'1/2 local + 1/2 cross(1)' (see `scca-eval patterns list`)")


def pattern_option(several: bool = True, purpose: str = ""):
    """``--pattern``/``-p``. ``several``: any number, in the one list syntax (parameter
    ``patterns``, a list; none given = []); else one (parameter ``pattern``, default full).
    ``purpose`` ends the help (what the pattern is for in this command)."""
    if several:
        return click.option("--pattern", "-p", "patterns", multiple=True, callback=names_callback,
                            help=f"{pattern_help()}; comma-separated (full,s2) or repeated.{purpose} "
                                 "Default: full.")
    return click.option("--pattern", "-p", default="full", show_default=True,
                        help=f"{pattern_help(several=False)}.{purpose}")


def pattern_size_options(chunk_default: str = "a quarter of the window"):
    """--chunk-size and --dilation: the settings every pattern is resolved with.
    ``chunk_default``: what the default chunk size is a quarter of, in this command's words."""
    return _stack(
        click.option("--chunk-size", type=int, default=None,
                     help=f"Chunk size G in tokens for the chunked rules. Default: {chunk_default}."),
        click.option("--dilation", type=int, default=None,
                     help=f"Dilation r of the sda pattern. Default: {DEFAULT_DILATION}."),
    )


ATTENTION_BACKEND_HELP = (
    "Kernel for sparse patterns: auto = the fastest measured for the case on a GPU "
    "(attention/backend_table.json), else strided to evaluate and packed (one varlen FlashAttention call per "
    "layer, where it runs; else strided) to train; chunked on CPU.")


def attention_backend_option(default: str | None = "auto"):
    """``--attention-backend``: one of choices.ATTENTION_BACKENDS. ``default=None``: unset unless
    given (the sweep, whose file may set it); it still means auto."""
    return click.option("--attention-backend", type=click.Choice(list(ATTENTION_BACKENDS)), default=default,
                        show_default=default is not None,
                        help=ATTENTION_BACKEND_HELP + ("" if default is not None else " Default: auto."))


def pattern_settings_options(func=None, *, chunk_default: str = "a quarter of the window",
                             backend_default: str | None = "auto"):
    """--chunk-size, --dilation and --attention-backend: how a pattern is sized and run, for
    every command that loads a model under a pattern. Usable bare (``@pattern_settings_options``)
    or with settings (``@pattern_settings_options(chunk_default=...)``)."""
    decorate = _stack(pattern_size_options(chunk_default), attention_backend_option(backend_default))
    return decorate if func is None else decorate(func)
