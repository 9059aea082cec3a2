"""`--help` with the options grouped under headings (what to evaluate, how, where to write, ...)."""

from __future__ import annotations

import click


class SectionedCommand(click.Command):
    """A click command whose ``--help`` lists its options in named sections.

    ``sections`` maps a heading to the parameter names (the Python names, e.g.
    ``"max_tokens"``) listed under it, in order. Options not named in any section are
    listed last under "Other options", so a new option never disappears from the help.
    """

    def __init__(self, *args, sections: dict[str, list[str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sections = sections or {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):  # arguments are in the usage line
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                rows[param.name] = record
        placed = set()
        for heading, names in self.sections.items():
            section_rows = [rows[name] for name in names if name in rows]
            placed.update(names)
            if section_rows:
                with formatter.section(heading):
                    formatter.write_dl(section_rows)
        rest = [record for name, record in rows.items() if name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)
