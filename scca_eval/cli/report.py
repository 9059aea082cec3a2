"""`scca-eval table`: tables from result records alone (no model needed)."""

from __future__ import annotations

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--digits", type=int, default=2, show_default=True, help="Decimals of each perplexity.")
def table(paths, digits):
    """Markdown tables (one per task; rows model · pattern, columns ctx) from result files or folders."""
    from ..results import load_records, markdown_tables

    click.echo(markdown_tables(load_records(paths), digits=digits))
