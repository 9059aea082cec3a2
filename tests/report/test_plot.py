"""`scca-eval plot`: PNG and SVG files are written, hold the data, and need matplotlib."""

from __future__ import annotations

import os
import sys

import pytest

from scca_eval.errors import MissingDependency, UserError
from scca_eval.report.plot import output_paths, plot_records
from scca_eval.report.reference import load_reference
from scca_eval.records import write_record
from helpers import make_record, run_cli

pytest.importorskip("matplotlib")


@pytest.fixture
def records():
    out = []
    for task in ("pg19_sample", "proof_pile_sample"):
        for pattern, base in (("full", 12.0), ("s2", 13.0), ("longmixed", 12.5)):
            for step, ctx in enumerate((1024, 2048, 4096, 8192)):
                value = base - step * 0.7
                out.append(make_record(task=task, pattern=pattern, ctx=ctx, ppl=value,
                                       ci95=[value - 0.2, value + 0.3]))
    return out


def test_png_and_svg_are_written(tmp_path, records):
    paths = plot_records(records, tmp_path / "plots" / "ppl", references=[load_reference("scca_paper_pg19")])
    assert paths == [tmp_path / "plots" / "ppl.png", tmp_path / "plots" / "ppl.svg"]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    text = svg.decode("utf-8")
    assert "<svg" in text
    # one panel per task, one legend entry per row (published rows included), log2 ticks
    for label in ("pg19_sample", "proof_pile_sample", "full", "s2", "longmixed",
                  "S2 (published, LLaMA2-7B 8k)", "8192"):
        assert label in text, label


def test_suffix_in_prefix_is_dropped(tmp_path):
    assert output_paths(tmp_path / "fig.png") == [tmp_path / "fig.png", tmp_path / "fig.svg"]


def test_cli_plot(tmp_path, records, capsys):
    for record in records:
        write_record(record, tmp_path / "runs")
    code, out, err = run_cli(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")], capsys)
    assert code == 0
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.svg").stat().st_size > 0
    code, out, err = run_cli(["plot", str(tmp_path / "runs")], capsys)
    assert code == 2 and "--out" in err


def test_matplotlib_is_in_the_default_install():
    """`plot` works after the README's install line (no extra needed)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert "matplotlib" in {Requirement(r).name for r in project["dependencies"]}


def test_missing_matplotlib_says_how_to_install_it(tmp_path, records, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    with pytest.raises(MissingDependency, match=r"pip install matplotlib"):
        plot_records(records, tmp_path / "fig")
    for record in records[:2]:
        write_record(record, tmp_path / "runs")
    code, out, err = run_cli(["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig")], capsys)
    assert code == 2 and "pip install matplotlib" in err
    assert not (tmp_path / "fig.png").exists()


def test_failed_rendering_keeps_the_old_files(tmp_path, records, monkeypatch):
    """Each file is rendered into a temporary file and renamed: a failure part-way leaves the
    previous PNG and SVG as they were and no temporary file behind."""
    from matplotlib.figure import Figure

    old = {tmp_path / "fig.png": b"old png", tmp_path / "fig.svg": b"old svg"}
    for path, content in old.items():
        path.write_bytes(content)

    def broken_savefig(self, target, **kwargs):
        handle = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
        handle.write(b"half a picture")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="renderer failed"):
        plot_records(records, tmp_path / "fig")
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_a_folder_in_the_way_fails_before_any_file(tmp_path, records):
    (tmp_path / "fig.svg").mkdir()
    with pytest.raises(UserError, match=r"fig\.svg: it is a folder"):
        plot_records(records, tmp_path / "fig")
    assert [p.name for p in tmp_path.iterdir()] == ["fig.svg"]  # no PNG written first


def _line_colours(svg: str) -> set[str]:
    """Stroke colours of the drawn data lines (matplotlib's C0..C9 cycle)."""
    import re

    cycle = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
             "#17becf"}
    return set(re.findall(r"stroke: (#[0-9a-f]{6})", svg)) & cycle


def test_rows_of_one_pattern_with_other_adapters_get_a_colour_each(tmp_path):
    records = []
    for adapter, trained, base in ((None, None, 12.0), ("ckpt/s2", "s2", 11.0), ("ckpt/longmixed", "longmixed", 11.5)):
        for step, ctx in enumerate((1024, 2048)):
            record = make_record(pattern="full", ctx=ctx, ppl=base - step)
            if adapter:
                record["config"]["model"]["adapter"] = {"path": adapter, "training_pattern": trained}
            records.append(record)
    plot_records(records, tmp_path / "variants")
    svg = (tmp_path / "variants.svg").read_text(encoding="utf-8")
    assert len(_line_colours(svg)) == 3
    assert "trained under longmixed" in svg


def test_records_of_other_budgets_get_a_picture_each_with_every_text_inside(tmp_path):
    """A folder holding a quick look (--max-tokens) beside whole-document runs is drawn, a
    picture per budget, and no title or subtitle reaches beyond its picture."""
    from scca_eval.report.grid import build_grids
    from scca_eval.report.plot import grids_figure, text_outside

    pytest.importorskip("matplotlib")
    quick = [make_record(task=task, ctx=ctx, ppl=10.0 + ctx / 1024) for task in ("pg19_sample", "proof_pile_sample")
             for ctx in (512, 1024)]
    for record in quick:
        record["config"]["max_tokens"] = 2048
    whole = [make_record(task="pg19_sample", ctx=1024, ppl=9.0)]
    for record in quick[1::2]:
        record["metrics"]["tokens"] = 2046  # columns that differ: the long "scored per cell" subtitles
    paths = plot_records(quick + whole, tmp_path / "ppl", title="a title " * 12)
    assert sorted(p.name for p in paths) == ["ppl-max2048.png", "ppl-max2048.svg", "ppl-whole.png", "ppl-whole.svg"]
    figure = grids_figure(build_grids(quick), "perplexity", "a title " * 12)
    assert text_outside(figure) == []
