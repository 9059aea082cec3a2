"""A record whose fields have the wrong type is refused where records are read: one line
naming the file and the field, exit 2, for every command that reads records."""

import json

import pytest

from helpers import make_record, run_cli

WRONG_FIELDS = [
    (("config",), None, "'config'"),
    (("ctx",), "abc", "'ctx'"),
    (("stride",), 1.5, "'stride'"),
    (("documents",), None, "'documents'"),
    (("metrics",), [], "'metrics'"),
    (("config", "model"), "m", "'config.model'"),
    (("metrics", "ci95"), 3, "'metrics.ci95'"),
    (("documents", 0, "nll_sum"), "1.0", "'documents[0].nll_sum'"),
    (("documents", 0, "tokens"), None, "'documents[0].tokens'"),
]


def _write(folder, record):
    folder.mkdir(exist_ok=True)
    path = folder / f"{record['model']}__{record['pattern']}.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


@pytest.mark.parametrize("where, value, named", WRONG_FIELDS)
@pytest.mark.parametrize("command", ["table", "compare"])
def test_wrongly_typed_field_is_refused_in_one_line(tmp_path, capsys, command, where, value, named):
    damaged = make_record(model="new")
    target = damaged
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    path = _write(tmp_path / "new", damaged)
    _write(tmp_path / "base", make_record(model="base"))
    args = ["table", str(tmp_path / "new")] if command == "table" \
        else ["compare", str(tmp_path / "base"), str(tmp_path / "new")]
    code, out, err = run_cli(args, capsys)
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(path) in line and named in line
