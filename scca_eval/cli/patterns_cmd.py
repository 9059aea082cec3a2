"""`scca-eval patterns`: list, draw and export the attention patterns."""

from __future__ import annotations

import os

import click

from ..errors import UserError
from .options import output_file_callback, pattern_size_options

NAME_HELP = ("A preset (full, s2, scca_fixed, scca_flow, sda, longmixed) or a custom mix such as "
             "'1/2 local + 1/2 cross(1)' (see docs/patterns.md).")


def _window_options(function):
    """--ctx, --heads, --chunk-size and --dilation, shared by the subcommands."""
    options = [
        click.option("--ctx", type=int, default=8192, show_default=True,
                     help="Window length N in tokens."),
        click.option("--heads", type=int, default=32, show_default=True,
                     help="Query heads H per layer (SmolLM2-135M has 9, LLaMA-2-7B 32)."),
        pattern_size_options(chunk_default="a quarter of --ctx"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _spec_for(name: str, ctx: int, heads: int, chunk_size: int | None, dilation: int | None):
    from ..validation import resolve_pattern_spec

    if ctx < 1:
        raise UserError(f"--ctx {ctx} is below 1; give the window length in tokens")
    if heads < 1:
        raise UserError(f"--heads {heads} is below 1; give the number of query heads")
    return resolve_pattern_spec(name, [ctx], chunk_size=chunk_size, dilation=dilation)


@click.group()
def patterns():
    """List, draw and export the attention patterns (docs/patterns.md)."""


@patterns.command("list")
@_window_options
def list_patterns(ctx, heads, chunk_size, dilation):
    """Each preset, what it does, and its density at --ctx.

    Density is the share of the causal (query, key) pairs the pattern keeps,
    averaged over the --heads query heads (1.0 for full attention).
    """
    from rich.console import Console
    from rich.table import Table

    from ..patterns.masks import density
    from ..patterns.presets import PRESET_DESCRIPTIONS

    table = Table(title=f"attention patterns at ctx {ctx}, {heads} heads")
    table.add_column("pattern", style="bold")
    table.add_column("density", justify="right")
    table.add_column("what it does")
    for name, description in PRESET_DESCRIPTIONS.items():
        spec = _spec_for(name, ctx, heads, chunk_size, dilation)
        table.add_row(name, f"{density(spec, ctx, heads):.3f}", description)
    console = Console()
    console.print(table)
    console.print("Custom mixes: e.g. --pattern '1/2 local + 1/2 cross(1)' (see docs/patterns.md).")


# A rich Panel takes two columns for its borders and two for its padding.
_PANEL_BORDER = 4


@patterns.command("show")
@click.argument("name")
@_window_options
@click.option("--png", "png_path", type=click.Path(dir_okay=False), default=None, callback=output_file_callback,
              help="Also draw the masks into this PNG file (with matplotlib).")
@click.option("--cells", type=click.IntRange(4, 1000), default=None,
              help="Characters per side of each terminal drawing. Default: one per token, as many "
                   "as the terminal's width allows.")
def show(name, ctx, heads, chunk_size, dilation, png_path, cells):
    """Draw each head group's mask of NAME in the terminal.

    NAME is a preset or a custom mix. Rows are queries, columns keys, one
    character per token when the terminal is wide enough; otherwise each
    character is a block of about ctx/cells positions (the drawing says so):
    '█' keeps all its causal pairs, '▓▒░' fewer, '·' none; blank cells lie
    after the diagonal.
    """
    from rich.console import Console
    from rich.panel import Panel

    from ..patterns.masks import density, group_title, render_rule, save_png

    spec = _spec_for(name, ctx, heads, chunk_size, dilation)
    chunk = spec.chunk_for(ctx)
    console = Console()
    if cells is None:
        cells = max(4, console.width - _PANEL_BORDER)
    cells = min(cells, ctx)
    console.print(f"[bold]{spec.name}[/bold] ({spec.canonical()}): ctx {ctx}, {heads} heads, "
                  f"density {density(spec, ctx, heads):.3f}")
    if cells < ctx:
        console.print(f"downsampled: each character covers about {ctx / cells:.1f} tokens per side "
                      f"({cells} of {ctx}); a smaller --ctx or a wider terminal draws one per token")
    for first, end, rule in spec.head_groups(ctx, heads):
        drawing = "\n".join(render_rule(rule, ctx, chunk, cells))
        console.print(Panel(drawing, title=group_title(first, end, rule, chunk), expand=False))
    if png_path:
        save_png(spec, ctx, heads, png_path)
        console.print(f"wrote {png_path}")


@patterns.command("export")
@click.argument("name")
@_window_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="The .npy file to write: a boolean array [H, N, N], True = attends.")
def export(name, ctx, heads, chunk_size, dilation, out_path):
    """Save the boolean mask of NAME as a .npy file.

    The array is [H, N, N] (heads x queries x keys), True where the query
    attends the key. NAME is a preset or a custom mix. The file is written atomically (a temporary file, then a rename). It holds
    heads x ctx x ctx bytes, e.g. 2 GiB for 32 heads at ctx 8192; an export larger
    than the free space of the folder is refused before anything is written.
    """
    import numpy as np

    from ..files import allocate, atomic_path, check_output_path, free_space, size_text
    from ..patterns.masks import rule_mask

    spec = _spec_for(name, ctx, heads, chunk_size, dilation)
    check_output_path(out_path)  # a file in the way of the folder is named as such
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {out_path}: the folder {folder} does not exist")
    size = heads * ctx * ctx  # one byte per (head, query, key), plus a header of a few hundred bytes
    free = free_space(folder)
    if size > free:
        raise UserError(f"cannot write {out_path}: the mask takes {size_text(size)} ({heads} x {ctx} x {ctx} bytes) "
                        f"and {folder} has {size_text(free)} free; give fewer --heads or a smaller "
                        "--ctx, or write to another folder")
    chunk = spec.chunk_for(ctx)
    with atomic_path(out_path, suffix=".npy") as temp:
        # Written head group by head group into a memory-mapped file, so the
        # whole [H, N, N] array never has to sit in memory.
        array = np.lib.format.open_memmap(temp, mode="w+", dtype=np.bool_, shape=(heads, ctx, ctx))
        allocate(temp, os.path.getsize(temp))  # a disk that fills up meanwhile: an error, not a SIGBUS
        for first, end, rule in spec.head_groups(ctx, heads):
            array[first:end] = rule_mask(rule, ctx, chunk).numpy()[None]
        array.flush()
        del array
    click.echo(f"wrote {out_path}: bool [{heads}, {ctx}, {ctx}] mask of {spec.name}")
