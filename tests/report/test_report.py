"""`scca-eval table`: records with known numbers in, paper-style tables out."""

from __future__ import annotations

import csv
import io
import json

import pytest

from helpers import make_record, run_cli

from scca_eval.errors import UserError
from scca_eval.report.grid import build_grids
from scca_eval.report.reference import load_reference
from scca_eval.report.tables import markdown_tables, render_tables
from scca_eval.records import load_records, write_record

def table_rows(markdown: str) -> dict[str, list[str]]:
    """Row label -> cell texts, for every table row of a markdown block."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def table_blocks(markdown: str) -> list[str]:
    """The tables of a markdown text, each from its bold title line to the next."""
    blocks: list[list[str]] = []
    for line in markdown.splitlines():
        if line.startswith("**"):
            blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(block) for block in blocks]


@pytest.fixture
def grid_records():
    # full is best at 1024, s2 at 2048; scca_fixed ties full at 4096 (to two decimals)
    values = {"full": [10.0, 9.5, 9.001], "s2": [10.5, 9.25, 9.2], "scca_fixed": [12.0, 11.0, 8.9996]}
    return [make_record(pattern=p, ctx=c, ppl=v, ci95=[v - 0.25, v + 0.5])
            for p, vs in values.items() for c, v in zip((1024, 2048, 4096), vs)]


def test_markdown_cells_and_bold_marks(grid_records):
    text = render_tables(grid_records)
    rows = table_rows(text)
    assert rows["pattern"] == ["1024", "2048", "4096"]
    assert rows["full"] == ["**10.00**", "9.50", "**9.00**"]
    assert rows["s2"] == ["10.50", "**9.25**", "9.20"]
    assert rows["scca_fixed"] == ["12.00", "11.00", "**9.00**"]  # a tie as shown is bold on both rows
    assert list(rows)[1:] == ["full", "s2", "scca_fixed"]        # the paper's order
    assert text.startswith("**pg19_sample**") and "model: m" in text


def test_ci_shows_half_width(grid_records):
    rows = table_rows(render_tables(grid_records, ci=True, digits=3))
    # ci95 = [v - 0.25, v + 0.5] -> half width 0.375
    assert rows["full"][0] == "**10.000 ± 0.375**"
    assert rows["s2"][1] == "**9.250 ± 0.375**"


def test_single_row_has_no_bold():
    rows = table_rows(render_tables([make_record(ppl=7.0), make_record(ctx=2048, ppl=6.0)]))
    assert rows["full"] == ["7.00", "6.00"]


def test_missing_cell_and_one_table_per_task():
    records = [make_record(pattern="full", ctx=1024, ppl=5.0), make_record(pattern="s2", ctx=2048, ppl=6.0),
               make_record(task="proof_pile_sample", pattern="s2", ctx=1024, ppl=3.0)]
    blocks = table_blocks(render_tables(records))
    assert blocks[0].startswith("**pg19_sample**") and blocks[1].startswith("**proof_pile_sample**")
    rows = table_rows(blocks[0])
    assert rows["full"] == ["5.00", "–"] and rows["s2"] == ["–", "6.00"]
    assert table_rows(blocks[1])["s2"] == ["3.00"]


def test_metric_choice():
    records = [make_record(pattern=p, ppl=9.0, bits_per_byte=b, word_perplexity=w)
               for p, b, w in (("full", 0.91, 30.0), ("s2", 0.95, 28.5))]
    rows = table_rows(render_tables(records, metric="bits_per_byte", digits=3))
    assert rows["full"] == ["**0.910**"] and rows["s2"] == ["0.950"]
    rows = table_rows(render_tables(records, metric="word_perplexity"))
    assert rows["full"] == ["30.00"] and rows["s2"] == ["**28.50**"]
    with pytest.raises(UserError, match="--ci"):
        render_tables(records, metric="bits_per_byte", ci=True)


def test_reference_rows_are_labelled_and_never_bold(grid_records):
    reference = load_reference("scca_paper_pg19")
    text = render_tables(grid_records, references=[reference])
    rows = table_rows(text)
    assert rows["pattern"] == ["1024", "2048", "4096", "8192"]  # published ctx columns are added
    assert rows["S2 (published, LLaMA2-7B 8k)"] == ["11.71", "10.73", "9.98", "9.41"]
    assert rows["SCCA_fixed (published, LLaMA2-7B 8k)"] == ["11.26", "10.33", "9.63", "9.17"]
    assert rows["SCCA_flow (published, LLaMA2-7B 8k)"] == ["11.59", "10.64", "9.94", "9.47"]
    assert rows["LongMixed (published, LLaMA2-7B 8k)"] == ["10.49", "9.65", "9.10", "8.73"]
    assert rows["full"] == ["**10.00**", "9.50", "**9.00**", "–"]  # measured best stays bold
    # published rows come after every measured row, under their own heading, with the source
    labels = list(rows)
    heading = labels.index("*published figures, not measured here*")
    assert all("published" not in label for label in labels[:heading])
    assert all("(published, LLaMA2-7B 8k)" in label for label in labels[heading + 1:])
    assert "arXiv:2312.07305" in text


def test_reference_goes_to_its_task_only():
    reference = load_reference("scca_paper_pg19")
    text = render_tables([make_record(task="proof_pile_sample")], references=[reference])
    proof, published = table_blocks(text)
    assert "published" not in proof
    assert published.startswith("**pg19**") and "S2 (published, LLaMA2-7B 8k)" in published
    with pytest.raises(UserError, match="--metric perplexity"):
        render_tables([make_record(bits_per_byte=1.0)], references=[reference], metric="bits_per_byte")


def test_csv_has_full_precision_and_published_kind(grid_records):
    reference = load_reference("scca_paper_pg19")
    rows = list(csv.DictReader(io.StringIO(render_tables(grid_records, format="csv", ci=True,
                                                         references=[reference]))))
    full = next(r for r in rows if r["row"] == "full")
    assert (full["kind"], full["model"], full["pattern"]) == ("measured", "m", "full")
    assert float(full["4096"]) == 9.001 and float(full["4096_ci95_low"]) == 9.001 - 0.25
    assert full["8192"] == ""
    s2_published = next(r for r in rows if r["row"] == "S2 (published, LLaMA2-7B 8k)")
    assert s2_published["kind"] == "published" and float(s2_published["8192"]) == 9.41
    assert "2312.07305" in s2_published["source"]


def test_latex(grid_records):
    text = render_tables(grid_records, format="latex", references=[load_reference("scca_paper_pg19")], ci=True)
    assert r"\begin{tabular}{lrrrr}" in text and r"\toprule" in text and r"\bottomrule" in text
    assert r"full & \textbf{10.00 $\pm$ 0.38} & 9.50 $\pm$ 0.38 & \textbf{9.00 $\pm$ 0.38} & -- \\" in text
    assert r"scca\_fixed & " in text
    assert r"SCCA\_fixed (published, LLaMA2-7B 8k) & 11.26 & 10.33 & 9.63 & 9.17 \\" in text
    assert r"\textit{Published figures, not measured here}" in text


def test_rows_by_model():
    records = [make_record(model=m, pattern=p, ppl=v)
               for m, p, v in (("a", "full", 8.0), ("a", "s2", 8.5), ("b", "full", 7.5), ("b", "s2", 9.0))]
    rows = table_rows(render_tables(records))  # auto: two models -> model · pattern
    assert rows["model · pattern"] == ["1024"]
    assert rows["a · full"] == ["8.00"] and rows["b · full"] == ["**7.50**"] and rows["b · s2"] == ["9.00"]
    with pytest.raises(UserError, match="--rows model-pattern"):
        render_tables(records, rows="pattern")
    with pytest.raises(UserError, match="--rows model-pattern"):
        render_tables(records, rows="model")
    one_pattern = [r for r in records if r["pattern"] == "full"]
    text = render_tables(one_pattern, rows="model")
    assert table_rows(text)["b"] == ["**7.50**"] and "pattern: full" in text


def test_labels_tell_apart_settings_and_strides():
    records = [make_record(pattern="sda", dilation=2, ppl=9.0), make_record(pattern="sda", dilation=4, ppl=9.5),
               make_record(pattern="s2", stride=256, ppl=8.0), make_record(pattern="s2", ppl=8.2)]
    rows = table_rows(render_tables(records))
    assert rows["sda (r=2)"] == ["9.00"] and rows["sda (r=4)"] == ["9.50"]
    assert rows["s2 · stride 256"] == ["**8.00**"] and rows["s2"] == ["8.20"]


def test_duplicate_cell_is_refused():
    with pytest.raises(UserError, match="two records"):
        render_tables([make_record(ppl=1.5), make_record(ppl=2.5)])


def test_files_folders_and_ppl_renderer(tmp_path, grid_records):
    for record in grid_records:
        write_record(record, tmp_path / "runs")
    first = sorted((tmp_path / "runs").glob("*.json"))[0]
    records = load_records([tmp_path / "runs", first])  # a file named twice is read once
    assert len(records) == len(grid_records)
    assert "path" not in json.loads(first.read_text())   # read location is not stored
    assert markdown_tables(records) == render_tables(grid_records)  # `ppl`'s end-of-run table


def test_cli_table(tmp_path, grid_records, capsys):
    for record in grid_records:
        write_record(record, tmp_path)
    code, out, err = run_cli(["table", str(tmp_path), "--ci", "--reference", "scca_paper_pg19"], capsys)
    assert code == 0
    assert out.strip() == render_tables(load_records([tmp_path]), ci=True,
                                        references=[load_reference("scca_paper_pg19")])
    code, out, err = run_cli(["table", str(tmp_path), "-f", "latex", "-o", str(tmp_path / "t.tex")], capsys)
    assert code == 0 and (tmp_path / "t.tex").read_text().startswith("% needs")

    for args, message in ((["table", str(tmp_path / "missing")], "no such result file"),
                          (["table", str(tmp_path), "--reference", "nope"], "unknown reference"),
                          (["table", str(tmp_path), "--metric", "bits_per_byte", "--ci"], "--ci"),
                          (["table"], "nothing to tabulate")):
        code, out, err = run_cli(args, capsys)
        assert code == 2, args
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_reference_file(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text("title: t\nsource: s\nsetting: x\nlabel: l\ntask: pg19\nmetric: perplexity\n"
                    "ctx: [1024, 2048]\nrows:\n  - {name: S2, pattern: s2, values: [1.0]}\n")
    with pytest.raises(UserError, match="one value per ctx"):
        load_reference(path)


# -- records as a DataFrame, variants, budgets ---------------------------------------------
def _variant(record, *, adapter=None, rope=None, trained=None, max_tokens=None):
    model = record["config"]["model"]
    if adapter is not None:
        model["adapter"] = {"path": adapter, **({"training_pattern": trained} if trained else {})}
    model["rope_scaling"] = rope
    record["config"]["max_tokens"] = max_tokens
    return record


def test_read_records_gives_one_row_per_cell_and_the_documents(tmp_path):
    import scca_eval

    records = [make_record(pattern="full", ctx=1024, ppl=10.0), make_record(pattern="s2", ctx=2048, ppl=12.5)]
    records[1]["documents"].append({"id": "d1", "nll_sum": 2.5, "tokens": 50, "bytes": 200, "words": 40})
    for record in records:
        write_record(record, tmp_path)
    frame = scca_eval.read_records(tmp_path)
    assert len(frame) == 2
    by_pattern = frame.set_index("pattern")
    assert by_pattern.loc["s2", "perplexity"] == 12.5 and by_pattern.loc["full", "ctx"] == 1024
    assert by_pattern.loc["s2", "documents"] == 2 and by_pattern.loc["s2", "protocol"] == "stride"
    documents = scca_eval.read_records(tmp_path, per_document=True)
    assert sorted(documents["document"]) == ["d0", "d0", "d1"]
    s2 = documents[documents["pattern"] == "s2"]
    assert s2["nll_sum"].sum() == 3.5 and s2["tokens"].sum() == 150


def test_rows_are_labelled_by_the_variant_setting_that_differs():
    """Same model id and pattern, different RoPE scaling or adapter: two rows, not a refusal."""
    records = [_variant(make_record(ppl=10.0)),
               _variant(make_record(ppl=9.0), rope={"rope_type": "linear", "factor": 2.0, "requested": "linear:2"}),
               _variant(make_record(ppl=8.0), adapter="/x/ft-s2", trained="s2",
                        rope={"rope_type": "linear", "factor": 2.0, "requested": "linear:2"})]
    rows = table_rows(render_tables(records))
    assert set(rows) - {"pattern"} == {"full · no adapter · no RoPE scaling",
                         "full · no adapter · RoPE linear:2",
                         "full · adapter ft-s2 · RoPE linear:2 · trained under s2"}


def test_records_of_different_budgets_get_tables_of_their_own():
    records = [_variant(make_record(pattern="full", ppl=10.0), max_tokens=16384),
               _variant(make_record(pattern="s2", ppl=12.0), max_tokens=None)]
    text = render_tables(records)
    first, second = text.split("### ")[1:]
    assert first.startswith("--max-tokens 16,384") and "| full | 10.00 |" in first and "| s2 |" not in first
    assert second.startswith("whole documents") and "| s2 | 12.00 |" in second and "| full |" not in second
    csv_lines = render_tables(records, format="csv").splitlines()
    assert "measured" in csv_lines[0].split(",") and len(csv_lines) == 3
    records[1]["config"]["max_tokens"] = 16384
    records[1]["config"]["protocol"] = "longlora"
    headings = [part.split("\n")[0] for part in render_tables(records).split("### ")[1:]]
    assert headings == ["protocol stride · --max-tokens 16,384", "protocol longlora · --max-tokens 16,384"]
    # the grid itself still refuses to put them in one column
    with pytest.raises(UserError, match="different --protocol"):
        build_grids(records)


def test_table_says_what_lies_behind_each_cell():
    records = [make_record(ctx=1024, ppl=10.0), make_record(ctx=8192, ppl=9.0)]
    records[1]["metrics"]["tokens"] = 16384
    records[1]["documents"] = records[1]["documents"] * 2
    text = render_tables(records)
    assert "*scored per cell: ctx 1024: 100 tokens of 1 document; ctx 8192: 16,384 tokens of 2 documents*" in text
    assert "*100 tokens of 1 document per cell*" in render_tables(records[:1])


def test_records_with_short_last_windows_are_labelled():
    """Records made with --last-window short, or before the option existed (no last_window in
    their config), never share a row with default ones."""
    legacy = make_record(pattern="full", ctx=2048, ppl=11.0)
    del legacy["config"]["last_window"]
    short = make_record(pattern="s2", ctx=2048, ppl=12.0)
    short["config"]["last_window"] = "short"
    rows = table_rows(render_tables([make_record(pattern="full", ctx=2048, ppl=10.0), legacy, short]))
    assert rows["full"] == ["**10.00**"]
    assert rows["full · short last window"] == ["11.00"]
    assert rows["s2 · short last window"] == ["12.00"]


def test_the_caption_names_the_adapter_every_row_shares():
    rope = {"rope_type": "linear", "factor": 2.0, "requested": "linear:2"}
    records = [_variant(make_record(model="default", pattern=p, ppl=10.0), adapter="/x/ft-s2", trained="s2", rope=rope)
               for p in ("full", "s2")]
    assert "model: default · adapter ft-s2 · RoPE linear:2 · trained under s2" in render_tables(records)
    plain = render_tables([make_record(model="default")])
    assert "model: default" in plain and "adapter" not in plain


def test_table_of_an_empty_folder_says_what_to_run_first(tmp_path, capsys):
    code, _, err = run_cli(["table", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"scca-eval ppl --out {tmp_path}" in err
