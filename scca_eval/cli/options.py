"""Click parameter types shared by the commands."""

from __future__ import annotations

import click


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
