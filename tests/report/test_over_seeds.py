"""results/finetune-smollm2-16k-v2/over_seeds.py: the per-seed `scca-eval compare --json`
verdicts gathered into one table (mean ± sd of the change, verdict counts), on files written
by compare itself."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
from helpers import make_record, run_cli

from scca_eval.records import write_record

SCRIPTS = Path(__file__).resolve().parents[2] / "results" / "finetune-smollm2-16k-v2"


@pytest.fixture(scope="module")
def over_seeds():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("over_seeds")
    finally:
        sys.path.remove(str(SCRIPTS))


def record(model, ctx, n_docs, factor):
    """A record of n_docs documents of 500 tokens; every document's perplexity times factor."""
    docs = [(f"doc{i}", 500 * (2.0 + 0.1 * i) + 500 * math.log(factor), 500) for i in range(n_docs)]
    rec = make_record(model=model, ctx=ctx)
    nll, tokens = math.fsum(d[1] for d in docs), sum(d[2] for d in docs)
    rec["metrics"].update(perplexity=math.exp(nll / tokens), nll_sum=nll, tokens=tokens)
    rec["documents"] = [{"id": i, "nll_sum": n, "tokens": t, "bytes": None, "words": None} for i, n, t in docs]
    return rec


def write_seed(tmp_path, capsys, name, seed, factors):
    """The s2 checkpoint and a pattern's checkpoint of one seed, compared as reproduce.sh does:
    ctx 2048 with 12 documents (testable), ctx 4096 with 3 (too few for a test)."""
    base, new = tmp_path / f"s2-seed{seed}", tmp_path / f"{name}-seed{seed}"
    for ctx, n_docs in ((2048, 12), (4096, 3)):
        write_record(record("s2-checkpoint", ctx, n_docs, 1.0), base)
        write_record(record(f"{name}-checkpoint", ctx, n_docs, factors[ctx]), new)
    out = tmp_path / "compare" / f"{name}-vs-s2-seed{seed}.json"
    out.parent.mkdir(exist_ok=True)
    code, _, err = run_cli(["compare", str(base), str(new), "--json", str(out)], capsys)
    assert code == 0, err


def test_the_table_counts_each_seeds_verdict(over_seeds, tmp_path, capsys):
    write_seed(tmp_path, capsys, "scca_fixed", 0, {2048: 1.06, 4096: 1.02})
    write_seed(tmp_path, capsys, "scca_fixed", 1, {2048: 1.08, 4096: 0.99})
    assert over_seeds.main([str(tmp_path / "compare"), "--out", str(tmp_path / "over")]) == 0
    table = (tmp_path / "over.md").read_text()
    # +6% and +8%: mean 7.0, sd sqrt(2) = 1.4; both seeds' tests find it.
    assert "| scca_fixed | +7.0 ± 1.4% · worse 2/2 | +0.5 ± 2.1% · not testable 2/2 (higher in 1/2) |" in table
    assert "against the s2 checkpoint of the same seed" in table and "Seeds: 0, 1." in table


def test_the_direction_of_untested_cells_is_counted(over_seeds, tmp_path, capsys):
    write_seed(tmp_path, capsys, "full", 0, {2048: 0.97, 4096: 0.98})
    write_seed(tmp_path, capsys, "full", 1, {2048: 0.99, 4096: 0.96})
    write_seed(tmp_path, capsys, "full", 2, {2048: 1.00, 4096: 0.97})
    assert over_seeds.main([str(tmp_path / "compare"), "--out", str(tmp_path / "over")]) == 0
    row = next(line for line in (tmp_path / "over.md").read_text().splitlines() if line.startswith("| full |"))
    assert row.endswith("| -3.0 ± 1.0% · not testable 3/3 (lower in 3/3) |")
    assert "better 2/3, equal 1/3" in row  # -3% and -1% found, 0% not


def test_files_against_two_references_are_refused(over_seeds, tmp_path, capsys):
    write_seed(tmp_path, capsys, "sda", 0, {2048: 1.5, 4096: 1.5})
    other = tmp_path / "compare" / "sda-vs-full-seed0.json"
    other.write_text((tmp_path / "compare" / "sda-vs-s2-seed0.json").read_text())
    assert over_seeds.main([str(tmp_path / "compare"), "--out", str(tmp_path / "over")]) == 2
    assert "more than one reference: full, s2" in capsys.readouterr().err
    assert not (tmp_path / "over.md").exists()
