"""`scca-eval table`, `compare` and `plot`: work on result records alone (no model needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .options import output_file_callback

METRIC_CHOICE = click.Choice(["perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"])
ROWS_CHOICE = click.Choice(["auto", "pattern", "model", "model-pattern"])

metric_option = click.option(
    "--metric", type=METRIC_CHOICE, default="perplexity", show_default=True,
    help="What the cells show. bits_per_byte and word_perplexity compare models with different tokenizers.")
rows_option = click.option(
    "--rows", type=ROWS_CHOICE, default="auto", show_default=True,
    help="What a row is: pattern, model, or model-pattern; auto = pattern for records of one model, "
         "model-pattern otherwise.")
reference_option = click.option(
    "--reference", "references", multiple=True, metavar="NAME|FILE",
    help="Add published rows from a reference file (results/reference/*.yaml), e.g. scca_paper_pg19; "
         "they are labelled 'published' and kept apart from measured rows. Repeatable.")


def _load_references(names):
    from ..report.reference import load_reference

    return [load_reference(name) for name in names]


def _refuse_overwriting_results(output: str | None, option: str, inputs, records) -> None:
    """A report never replaces a result record, a fine-tune run's files, a progress file, or a
    file it was made from."""
    if output is None:
        return
    from ..errors import UserError
    from ..evaluation.resume import SUFFIX as PROGRESS_SUFFIX
    from ..records.store import kept_output

    target = Path(output).resolve()
    if target in {Path(p).resolve() for p in inputs} | {Path(r["path"]).resolve() for r in records}:
        raise UserError(f"{option} {output} is one of the files this report reads; write the report to another file")
    if target.name.endswith(PROGRESS_SUFFIX) and target.exists():
        raise UserError(f"{option} {output} is the progress file of an unfinished cell; write the report to "
                        "another file")
    kept = kept_output(target)
    if kept:
        raise UserError(f"{option} {output} holds {kept}; write the report to another file")


def _write(text: str, output: str | None) -> None:
    if output is None:
        click.echo(text)
        return
    from ..files import atomic_write_text

    atomic_write_text(Path(output), text + "\n")
    click.echo(f"wrote {output}", err=True)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--format", "-f", "fmt", type=click.Choice(["markdown", "csv", "latex"]), default="markdown",
              show_default=True, help="markdown for READMEs and pull requests, csv (full precision, every task "
                                      "in one file) or latex (booktabs).")
@metric_option
@rows_option
@click.option("--ci", is_flag=True, help="Show ± half the width of the 95% bootstrap interval (perplexity only).")
@reference_option
@click.option("--digits", type=int, default=2, show_default=True, help="Decimals shown (markdown and LaTeX).")
@click.option("--output", "-o", type=click.Path(), default=None, callback=output_file_callback,
              help="Write to this file instead of stdout.")
def table(paths, fmt, metric, rows, ci, references, digits, output):
    """Paper-style tables from result files or folders: one table per task, rows = patterns
    (or models), columns = the ctx values present, best value per column in bold.
    Records measured differently (another --max-tokens or protocol) get tables of their own,
    each under a heading that says how they were measured.
    Passkey records (`scca-eval passkey`) get their own tables: accuracy by pattern × ctx,
    and by depth × ctx for each pattern (markdown or csv).

    \b
    Examples:
      scca-eval table results/runs
      scca-eval table results/smollm2-135m --ci --reference scca_paper_pg19
      scca-eval table results/a results/b --rows model-pattern --format latex -o table.tex
    """
    from ..report.tables import render_tables
    from ..files import check_output_path
    from ..records import load_records

    if output is not None:
        check_output_path(output)
    records = load_records(paths) if paths else []
    _refuse_overwriting_results(output, "--output", paths, records)
    passkey, records = _split_passkey(records)
    parts = []
    if records or references or not passkey:
        parts.append(render_tables(records, format=fmt, metric=metric, rows=rows, ci=ci,
                                   references=_load_references(references), digits=digits))
    if passkey:
        from ..report.passkey import passkey_tables

        parts.append(passkey_tables(passkey, format=fmt))
    _write("\n\n".join(parts), output)


def _split_passkey(records):
    """(passkey records, the others): passkey records have views of their own."""
    from ..records import is_passkey_record

    return [r for r in records if is_passkey_record(r)], [r for r in records if not is_passkey_record(r)]


@click.command()
@click.argument("base", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--max-regression", type=float, default=None, metavar="PCT",
              help="Gate: exit 1 when any cell's perplexity rose by more than PCT percent and significantly "
                   "(p < --alpha), when a cell has too little data for a test (it fails closed), when a "
                   "cell's perplexity is not finite (NaN or infinite) on either side, or when a cell of BASE is "
                   "missing in NEW (see --allow-missing). Without it, only report.")
@click.option("--allow-missing", is_flag=True,
              help="Cells of BASE that NEW lacks do not fail the gate: for comparing a subset on purpose. "
                   "Without it they fail it, since a run that stopped part-way leaves cells out.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Significance level of the paired bootstrap.")
@click.option("--bootstrap-samples", type=int, default=2000, show_default=True,
              help="Resamples of the paired bootstrap.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@click.option("--output", "-o", type=click.Path(), default=None, callback=output_file_callback,
              help="Also write the markdown report to this file (e.g. for a pull-request comment).")
@click.option("--json", "json_path", type=click.Path(), default=None, callback=output_file_callback,
              help="Also write every cell's numbers and verdict as JSON to this file (table, compare and plot "
                   "pass over it in a results folder).")
@click.pass_context
def compare(ctx, base, new, max_regression, allow_missing, alpha, bootstrap_samples, seed, output, json_path):
    """Compare NEW result records with BASE ones, cell by cell (task, pattern, ctx).

    For each cell: both perplexities, the relative change, and a paired bootstrap that
    says whether the change is significant: over documents when a cell has 10 or more,
    else over blocks of consecutive windows (a single document or stream is testable);
    a cell with too little for either cannot pass the gate. Records that are not
    comparable (other tokenizer, task data, protocol, stride, last window, --max-tokens
    or documents) are refused.
    Cells found on one side only are listed; with the gate, cells of BASE missing in NEW
    fail it (unless --allow-missing). When GITHUB_STEP_SUMMARY is set, the report is
    appended to that file (exit 2 when it cannot be).

    \b
    Exit status: 0 = no significant regression beyond --max-regression (or no gate),
    1 = the gate failed, 2 = bad input.

    \b
    Example (CI):
      scca-eval compare results/baseline new --max-regression 1
    """
    from ..errors import UserError
    from ..report.compare import compare_records
    from ..files import check_output_path
    from ..records import load_records

    if bootstrap_samples < 100:
        raise UserError(f"--bootstrap-samples must be at least 100 (got {bootstrap_samples})")
    if output is not None:
        check_output_path(output)  # before the report is printed, so a bad path fails alone
    if output is not None and json_path is not None and Path(output).resolve() == Path(json_path).resolve():
        raise UserError(f"--output and --json both name {output}; give each its own file")
    base_records, new_records = load_records([base]), load_records([new])
    for path, option in ((output, "--output"), (json_path, "--json")):
        _refuse_overwriting_results(path, option, [base, new], base_records + new_records)
    if _split_passkey(base_records)[0] or _split_passkey(new_records)[0]:
        raise UserError("compare works on perplexity records; passkey records have no per-document losses to "
                        "compare (show them side by side with scca-eval table)")
    comparison = compare_records(base_records, new_records, alpha=alpha,
                                 max_regression=max_regression, n_boot=bootstrap_samples, seed=seed,
                                 base_name=f"`{base}`", new_name=f"`{new}`", allow_missing=allow_missing)
    report = comparison.to_markdown()
    click.echo(report)
    if output is not None:
        _write(report, output)
    if json_path is not None:
        _write(json.dumps(comparison.to_dict(), indent=1, allow_nan=False), json_path)  # strict JSON
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        _append_to_summary(summary, report, comparison)
    if not comparison.passed:
        ctx.exit(1)


def _append_to_summary(summary: str, report: str, comparison) -> None:
    """Append the report to GitHub's job summary. A path that cannot be written is bad input
    (exit 2), never exit 1, which would read as a failed gate; the line says the gate's verdict."""
    from ..errors import UserError

    try:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(report + "\n\n")
    except OSError as error:
        verdict = "" if comparison.max_regression is None else \
            f" (the gate {'passed' if comparison.passed else 'failed'})"
        raise UserError(f"GITHUB_STEP_SUMMARY={summary}: cannot append the report "
                        f"({error.strerror or type(error).__name__}){verdict}; point it at a file in an existing "
                        "folder, or unset it") from None


@click.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--out", "-o", "prefix", required=True, type=click.Path(),
              help="File name prefix: writes PREFIX.png and PREFIX.svg.")
@metric_option
@rows_option
@reference_option
@click.option("--title", default=None, help="A title above the panels.")
def plot(paths, prefix, metric, rows, references, title):
    """Plot perplexity (or --metric) against ctx on a log2 axis from result files or
    folders: one panel per task, one line per pattern (or model), error bars from the 95%
    bootstrap intervals, published rows dashed. Records of another --max-tokens or protocol
    get a picture of their own (PREFIX-max2048.png, …). Passkey records (`scca-eval passkey`)
    are drawn as heat maps: accuracy (%) by depth × ctx, one panel per pattern, in
    PREFIX-passkey.png when perplexity records are drawn too (matplotlib, part of the
    default install).

    \b
    Example:
      scca-eval plot results/smollm2-135m --out results/smollm2-135m --reference scca_paper_pg19
    """
    from ..report.plot import plot_records
    from ..records import load_records

    from ..report.plot import output_paths

    records = load_records(paths) if paths else []
    passkey, records = _split_passkey(records)
    written = []
    if passkey:  # heat maps, under PREFIX-passkey when perplexity records are drawn too
        from ..report.passkey import plot_heatmaps

        base = output_paths(prefix)[0].with_suffix("")
        heatmaps = base.with_name(f"{base.name}-passkey") if records or references else base
        written += plot_heatmaps(passkey, heatmaps, title=title)
    if records or references or not passkey:
        written += plot_records(records, prefix, metric=metric, rows=rows,
                                references=_load_references(references), title=title)
    for path in written:
        click.echo(f"wrote {path}", err=True)
