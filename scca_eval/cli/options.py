"""Click parameter types shared by the commands, and the one list syntax of every option
that takes several values: items separated by commas (a comma inside a rule's parentheses,
as in ``dilated(2,0)``, belongs to the rule), and the option may be repeated."""

from __future__ import annotations

import os

import click

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


def rope_scaling_options(extra_help: str = "", bare_longlora: bool = False):
    """``--rope-scaling`` and ``--original-ctx`` for any command that loads a model.

    The value is checked when the command line is read (one line, exit 2, before anything
    loads) and passed on as written, for ``load_model(rope_scaling=..., original_ctx=...)``.
    ``bare_longlora``: the command fills in ``longlora``'s CTX itself (``ppl``: the largest ctx).
    """

    def check(_ctx, _param, value):
        from ..models.rope import parse_rope_scaling

        if value is not None and not (bare_longlora and value.strip().lower() == "longlora"):
            parse_rope_scaling(value)
        return value

    def decorate(command):
        command = click.option("--original-ctx", type=click.IntRange(min=1), default=None, metavar="L",
                               help=ORIGINAL_CTX_HELP)(command)
        return click.option("--rope-scaling", default=None, callback=check,
                            help=ROPE_SCALING_HELP + extra_help)(command)

    return decorate


def pattern_settings_options(func):
    """--chunk-size, --dilation and --attention-backend: how a pattern is sized and run, for the
    commands that load one model under a pattern (finetune, passkey)."""
    from ..choices import ATTENTION_BACKENDS

    for option in reversed([
        click.option("--chunk-size", type=int, default=None,
                     help="Chunk size G in tokens for the chunked rules. Default: a quarter of the window."),
        click.option("--dilation", type=int, default=None, help="Dilation r of the sda pattern. Default: 2."),
        click.option("--attention-backend", type=click.Choice(list(ATTENTION_BACKENDS)), default="auto",
                     show_default=True,
                     help="Kernel for sparse patterns: auto = the fastest measured for the case on a GPU (attention/backend_table.json), else packed (one varlen FlashAttention call per layer) where it runs, else strided; chunked on CPU."),
    ]):
        func = option(func)
    return func
