"""Pattern specs, the pattern syntax, the dense masks and the `patterns` CLI.

The masks are checked against the rule table of docs/patterns.md re-implemented
here with plain Python loops over (head, query, key), independent of
``Rule.allows`` and ``PatternSpec.head_rules``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from scca_eval.errors import MissingDependency, UserError
from scca_eval.patterns import (
    PRESET_DESCRIPTIONS,
    build_mask,
    check_against_ctx,
    density,
    render_rule,
    resolve_pattern,
    save_png,
)
from scca_eval.patterns.masks import row_counts

PRESETS = list(PRESET_DESCRIPTIONS)


# -- the rule table, written out independently ------------------------------------
def allowed(rule: tuple, q: int, k: int, G: int) -> bool:
    """docs/patterns.md, "Head rules", one pair at a time."""
    if k > q:
        return False
    kind = rule[0]
    if kind == "causal":
        return True
    if kind == "local":
        return q // G == k // G
    if kind == "shifted":
        s = G // 2 if rule[1] is None else rule[1]
        return (q + s) // G == (k + s) // G
    if kind == "cross":
        d = rule[1]
        if q // G - d < 0:
            return q // G == k // G
        return k // G == q // G - d
    if kind == "dilated":
        r, j = rule[1], rule[2]
        if q < j:
            return k == q
        return (q - k) % r == j
    raise AssertionError(kind)


def groups_of(name: str, n: int, G: int, r: int = 2) -> list[tuple[Fraction, tuple]]:
    """docs/patterns.md, "Presets"."""
    half = Fraction(1, 2)
    if name == "full":
        return [(Fraction(1), ("causal",))]
    if name == "s2":
        return [(half, ("local",)), (half, ("shifted", None))]
    if name == "scca_fixed":
        return [(half, ("local",)), (half, ("cross", 1))]
    if name == "scca_flow":
        count = -(-n // G)
        return [(Fraction(1, count), ("cross", g)) for g in range(count)]
    if name == "sda":
        return [(Fraction(1, r), ("dilated", r, j)) for j in range(r)]
    if name == "longmixed":
        return ([(Fraction(1, 4), ("local",)), (Fraction(1, 4), ("cross", 1)),
                 (Fraction(1, 8), ("dilated", 2, 0)), (Fraction(1, 8), ("dilated", 2, 1))]
                + [(Fraction(1, 16), ("dilated", 4, j)) for j in range(4)])
    raise AssertionError(name)


def expected_mask(groups, n: int, H: int, G: int) -> np.ndarray:
    """Heads assigned contiguously: group i starts at floor(S_i * H) ("Head groups")."""
    starts, total = [], Fraction(0)
    for share, _ in groups:
        starts.append(math.floor(total * H))
        total += share
    assert total == 1
    ends = starts[1:] + [H]
    mask = np.zeros((H, n, n), dtype=bool)
    for (_, rule), begin, end in zip(groups, starts, ends):
        for h in range(begin, end):
            for q in range(n):
                for k in range(n):
                    mask[h, q, k] = allowed(rule, q, k, G)
    return mask


MASK_CASES = [
    # (n, chunk_size, heads): G not dividing N, odd H (SmolLM2's 9), H below the group count
    (13, 4, 9),
    (16, 4, 2),
    (10, 3, 5),
    (7, None, 4),
    (21, 5, 32),
    (9, 2, 3),
]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("n,chunk_size,heads", MASK_CASES)
def test_preset_mask_matches_rule_table(name, n, chunk_size, heads):
    spec = resolve_pattern(name, chunk_size=chunk_size)
    G = chunk_size if chunk_size is not None else max(1, n // 4)
    expected = expected_mask(groups_of(name, n, G), n, heads, G)
    assert np.array_equal(build_mask(spec, n, heads).numpy(), expected)


@pytest.mark.parametrize("r", [1, 3, 4, 5])
def test_sda_dilation_matches_rule_table(r):
    n, heads = 17, 9
    spec = resolve_pattern("sda", dilation=r)
    expected = expected_mask(groups_of("sda", n, 4, r), n, heads, 4)
    assert np.array_equal(build_mask(spec, n, heads).numpy(), expected)


@pytest.mark.parametrize("text,groups", [
    ("1/3 shifted(2) + 1/3 cross(2) + 1/3 dilated(3,1)",
     [(Fraction(1, 3), ("shifted", 2)), (Fraction(1, 3), ("cross", 2)), (Fraction(1, 3), ("dilated", 3, 1))]),
    ("0.5 causal + 0.5 shifted(7)", [(Fraction(1, 2), ("causal",)), (Fraction(1, 2), ("shifted", 7))]),
    ("cross(3)", [(Fraction(1), ("cross", 3))]),
    ("1/4 local + 1/4 cross + 1/2 dilated(2,1)",
     [(Fraction(1, 4), ("local",)), (Fraction(1, 4), ("cross", 1)), (Fraction(1, 2), ("dilated", 2, 1))]),
])
def test_custom_mix_mask_matches_rule_table(text, groups):
    n, heads, G = 19, 7, 4
    spec = resolve_pattern(text, chunk_size=G)
    assert np.array_equal(build_mask(spec, n, heads).numpy(), expected_mask(groups, n, heads, G))


def test_every_preset_is_causal_with_no_empty_row_over_a_grid():
    for name, n, G, heads in itertools.product(PRESETS + ["sda3"], [1, 2, 5, 8, 13, 32], [1, 2, 3, 4, 8, 32],
                                               [1, 2, 3, 9, 16]):
        if G > n:
            continue
        spec = resolve_pattern("sda", chunk_size=G, dilation=3) if name == "sda3" else \
            resolve_pattern(name, chunk_size=G)
        mask = build_mask(spec, n, heads)
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        assert not (mask & above).any(), (name, n, G, heads)
        assert mask.any(dim=-1).all(), (name, n, G, heads)


def test_flow_groups_cover_every_earlier_chunk():
    # scca_flow with one head per group: together the heads cover every causal pair
    n, G = 20, 5
    spec = resolve_pattern("scca_flow", chunk_size=G)
    mask = build_mask(spec, n, 4)
    assert torch.equal(mask.any(0), torch.ones(n, n, dtype=torch.bool).tril())


# -- density ------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("n,chunk_size,heads", MASK_CASES)
def test_density_counts_the_mask(name, n, chunk_size, heads):
    spec = resolve_pattern(name, chunk_size=chunk_size)
    mask = torch.from_numpy(expected_mask(groups_of(name, n, spec.chunk_for(n)), n, heads, spec.chunk_for(n)))
    assert density(spec, n, heads) == pytest.approx(mask.sum().item() / (heads * n * (n + 1) / 2), abs=1e-12)
    for first, end, rule in spec.head_groups(n, heads):
        assert torch.equal(row_counts(rule, n, spec.chunk_for(n)), mask[first].sum(-1))


def test_density_by_hand():
    # s2, N=8, G=4, 2 heads: local keeps 10+10 pairs; shifted by 2 has segments of 2, 4, 2 -> 3+10+3.
    assert density(resolve_pattern("s2", chunk_size=4), 8, 2) == pytest.approx((20 + 16) / (2 * 36))
    assert density(resolve_pattern("full"), 8192, 32) == 1.0
    # sda(2): each head keeps about half the pairs
    assert density(resolve_pattern("sda"), 8192, 32) == pytest.approx(0.5, abs=1e-3)


# -- drawings ------------------------------------------------------------------------
def test_render_rule_one_cell_per_pair():
    n, G = 8, 3
    spec = resolve_pattern("scca_fixed", chunk_size=G)
    (_, _, local), (_, _, cross) = spec.head_groups(n, 2)
    for rule_tuple, rule in [(("local",), local), (("cross", 1), cross)]:
        lines = render_rule(rule, n, G, cells=n)
        expected = ["".join("█" if allowed(rule_tuple, q, k, G) else "·" for k in range(q + 1)) for q in range(n)]
        assert lines == expected


def test_render_rule_shades_partial_cells():
    # dilated(2, 0) at 2x2 positions per cell keeps some of each cell's causal pairs
    lines = render_rule(resolve_pattern("sda").groups[0][1], 16, 4, cells=4)
    assert len(lines) == 4 and all(set(line) <= set(" ░▒▓") for line in lines)


def test_save_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "longmixed.png"
    save_png(resolve_pattern("longmixed"), 64, 9, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["longmixed.png"]  # no temporary left behind
    with pytest.raises(UserError):
        save_png(resolve_pattern("s2"), 64, 4, tmp_path / "missing" / "x.png")


# -- the syntax ------------------------------------------------------------------------
def test_preset_names_are_forgiving():
    assert resolve_pattern("SCCA-fixed").name == "scca_fixed"
    assert resolve_pattern(" S2 ").name == "s2"
    assert resolve_pattern("LongMixed").name == "longmixed"


def test_mix_equal_to_preset_gives_same_mask():
    n, heads = 23, 6
    pairs = [("1/2 local + 1/2 shifted", "s2"), ("0.5 local + 0.5 cross(1)", "scca_fixed"),
             ("1/2 dilated(2,0) + 1/2 dilated(2,1)", "sda"), ("causal", "full")]
    for text, name in pairs:
        custom, preset = resolve_pattern(text, chunk_size=5), resolve_pattern(name, chunk_size=5)
        assert custom.name == "custom"
        assert torch.equal(build_mask(custom, n, heads), build_mask(preset, n, heads))


def test_shares_are_exact_fractions():
    spec = resolve_pattern("1/3 local + 1/3 cross(1) + 1/3 shifted")
    assert [share for share, _ in spec.groups] == [Fraction(1, 3)] * 3
    spec = resolve_pattern("0.1 local + 0.9 causal")
    assert [share for share, _ in spec.groups] == [Fraction(1, 10), Fraction(9, 10)]


def test_yaml_list_form():
    yaml = pytest.importorskip("yaml")
    text = """
pattern:
  - {share: 1/2, rule: local}
  - {share: 0.25, rule: cross(1)}
  - {share: 1/4, rule: "dilated(2,1)"}
"""
    items = yaml.safe_load(text)["pattern"]
    spec = resolve_pattern(items)
    assert spec.groups == resolve_pattern("1/2 local + 1/4 cross(1) + 1/4 dilated(2,1)").groups


def test_chunk_settings_and_dilation():
    assert resolve_pattern("s2", chunk_size=64).chunk_for(8192) == 64
    assert resolve_pattern("s2").chunk_for(8192) == 2048
    assert resolve_pattern("s2", chunk_ratio="1/8").chunk_for(8192) == 1024
    sda4 = resolve_pattern("sda", dilation=4)
    assert sda4.dilation == 4 and len(sda4.groups) == 4
    assert resolve_pattern("s2", dilation=4).dilation is None  # only sda has a dilation
    check_against_ctx(resolve_pattern("s2", chunk_size=1024), 1024)


BAD_INPUT = [
    (lambda: resolve_pattern("nonsense"), "unknown pattern"),
    (lambda: resolve_pattern("1/2 local + 1/2 windowed"), "unknown rule"),
    (lambda: resolve_pattern("1/2 local + 1/4 shifted"), "sum to 3/4"),
    (lambda: resolve_pattern("1/2 local + 3/4 shifted"), "sum to 5/4"),
    (lambda: resolve_pattern("0 local + 1 shifted"), "above 0"),
    (lambda: resolve_pattern("1/2 local +"), "empty term"),
    (lambda: resolve_pattern("1/2 local + 1/2"), "cannot read"),
    (lambda: resolve_pattern("1/2 local 1/2 shifted"), "cannot read"),
    (lambda: resolve_pattern("local + shifted"), "has no share"),
    (lambda: resolve_pattern("1/0 local"), "not a number"),
    (lambda: resolve_pattern(""), "empty pattern"),
    (lambda: resolve_pattern("dilated(2,2)"), "offset j must be in 0..1"),
    (lambda: resolve_pattern("dilated(0,0)"), "rate r must be 1 or more"),
    (lambda: resolve_pattern("dilated(2)"), "two parameters"),
    (lambda: resolve_pattern("cross(-1)"), "distance must be 0 or more"),
    (lambda: resolve_pattern("cross(1.5)"), "whole number"),
    (lambda: resolve_pattern("shifted(-3)"), "shift must be 0 or more"),
    (lambda: resolve_pattern("local(3)"), "no parameters"),
    (lambda: resolve_pattern("s2", chunk_size=0), "--chunk-size 0 is below 1"),
    (lambda: resolve_pattern("sda", dilation=0), "--dilation 0 is below 1"),
    (lambda: resolve_pattern("s2", chunk_ratio="3/2"), "at most 1"),
    (lambda: check_against_ctx(resolve_pattern("s2", chunk_size=2048), 1024), "above ctx 1024"),
    (lambda: resolve_pattern([{"share": "1/2", "rule": "local"}]), "sum to 1/2"),
    (lambda: resolve_pattern([{"share": "1/2", "rule": "local"}, {"share": "1/2"}]), "missing field 'rule'"),
    (lambda: resolve_pattern([{"share": 1, "rule": "local", "heads": 3}]), "unknown field 'heads'"),
    (lambda: resolve_pattern([]), "empty"),
]


@pytest.mark.parametrize("call,fragment", BAD_INPUT, ids=[fragment for _, fragment in BAD_INPUT])
def test_bad_input_is_one_clear_line(call, fragment):
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and len(message) < 200


# -- the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patterns_group():
    from scca_eval.cli.patterns_cmd import patterns

    return patterns


def _invoke(group, args):
    from click.testing import CliRunner

    return CliRunner().invoke(group, args, catch_exceptions=True)


def test_cli_list(patterns_group):
    result = _invoke(patterns_group, ["list", "--ctx", "64", "--heads", "8"])
    assert result.exit_code == 0, result.output
    for name in PRESETS:
        assert name in result.output
        assert f"{density(resolve_pattern(name), 64, 8):.3f}" in result.output


def test_cli_show(patterns_group, tmp_path):
    png = tmp_path / "s2.png"
    args = ["show", "1/2 local + 1/2 cross(1)", "--ctx", "32", "--heads", "4", "--chunk-size", "8"]
    result = _invoke(patterns_group, args + (["--png", str(png)] if _has_matplotlib() else []))
    assert result.exit_code == 0, result.output
    assert "heads 0-1: local, G=8" in result.output and "heads 2-3: cross(1), G=8" in result.output
    assert "█" in result.output


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name,args,groups", [
    ("longmixed", ["--ctx", "24", "--heads", "9"], lambda n, G: groups_of("longmixed", n, G)),
    ("sda", ["--ctx", "13", "--heads", "3", "--dilation", "3"], lambda n, G: groups_of("sda", n, G, 3)),
    ("scca_flow", ["--ctx", "21", "--heads", "5", "--chunk-size", "4"], lambda n, G: groups_of("scca_flow", n, G)),
])
def test_cli_export_writes_the_mask(patterns_group, tmp_path, name, args, groups):
    out = tmp_path / "mask.npy"
    result = _invoke(patterns_group, ["export", name, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    n, heads = int(args[1]), int(args[3])
    G = int(args[args.index("--chunk-size") + 1]) if "--chunk-size" in args else max(1, n // 4)
    saved = np.load(out)
    assert saved.dtype == np.bool_ and saved.shape == (heads, n, n)
    assert np.array_equal(saved, expected_mask(groups(n, G), n, heads, G))
    assert [p.name for p in tmp_path.iterdir()] == ["mask.npy"]  # written atomically, no leftovers


def test_cli_export_refuses_a_mask_larger_than_the_free_space(patterns_group, tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    result = _invoke(patterns_group, ["export", "s2", "--ctx", "64", "--heads", "4", "--out", str(tmp_path / "m.npy")])
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert "16.0 KiB (4 x 64 x 64 bytes)" in message and "9.8 KiB free" in message
    assert "fewer --heads or a smaller --ctx, or write to another folder" in message
    assert list(tmp_path.iterdir()) == []


def test_cli_export_on_a_disk_that_fills_up_leaves_no_temporary_file(patterns_group, tmp_path, monkeypatch):
    import errno
    import os

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    # The space check passed, then the disk filled up: the mask's file cannot be allocated.
    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    result = _invoke(patterns_group, ["export", "s2", "--ctx", "64", "--heads", "4", "--out", str(tmp_path / "m.npy")])
    assert isinstance(result.exception, UserError), result.output
    assert "the disk is full" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,fragment", [
    (["show", "bogus", "--ctx", "64"], "unknown pattern"),
    (["export", "s2", "--ctx", "64", "--chunk-size", "128", "--out", "x.npy"], "above ctx 64"),
    (["export", "s2", "--ctx", "64", "--out", "no/such/folder/x.npy"], "does not exist"),
    (["list", "--ctx", "0"], "below 1"),
    (["show", "s2", "--heads", "0"], "below 1"),
])
def test_cli_errors_are_user_errors(patterns_group, args, fragment):
    result = _invoke(patterns_group, args)
    assert isinstance(result.exception, UserError), result.output
    assert fragment in str(result.exception)


def test_missing_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingDependency, match=r"pip install matplotlib"):
        save_png(resolve_pattern("s2"), 16, 2, tmp_path / "x.png")


@pytest.mark.parametrize("text,settings", [(name, {}) for name in PRESET_DESCRIPTIONS] + [
    ("sda", {"dilation": 4, "chunk_size": 7}), ("s2", {"chunk_ratio": "1/8"}),
    ("1/4 local + 1/4 shifted(3) + 1/2 dilated(3,1)", {"chunk_size": 5}),
    ([{"share": 0.5, "rule": "shifted"}, {"share": 0.5, "rule": "cross(2)"}], {})])
def test_pattern_settings_read_back_to_the_same_spec(text, settings):
    from scca_eval.patterns.parse import pattern_from_dict

    spec = resolve_pattern(text, **settings)
    if text == "scca_flow":
        spec = dataclasses.replace(spec, name="my_flow")  # a flow spec under another name reads back too
    again = pattern_from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()


def _panels(text: str) -> list[list[str]]:
    """The drawing rows of each rich panel in ``text``."""
    panels, current = [], None
    for line in text.splitlines():
        if line.startswith("╭"):
            current = []
        elif line.startswith("╰"):
            panels.append(current)
            current = None
        elif current is not None:
            current.append(line.split("│")[1][1:].rstrip())
    return panels


def test_patterns_show_draws_one_cell_per_token_when_the_terminal_is_wide_enough(monkeypatch, capsys):
    """The README's example: every token of ctx 64 gets its own column, so the stripes of the
    dilated heads have their true period; checked against the dense reference mask."""
    from scca_eval.cli import main
    from scca_eval.patterns.masks import build_mask

    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main(["patterns", "show", "longmixed", "--ctx", "64", "--heads", "16"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "downsampled" not in out
    spec = resolve_pattern("longmixed")
    mask = build_mask(spec, 64, 16)
    groups = spec.head_groups(64, 16)
    panels = _panels(out)
    assert len(panels) == len(groups)
    for (first, _, _), rows in zip(groups, panels):
        expected = ["".join("█" if mask[first, q, k] else "·" for k in range(q + 1)) for q in range(64)]
        assert rows == expected


def test_patterns_show_says_when_it_downsamples(monkeypatch, capsys):
    from scca_eval.cli import main

    monkeypatch.setenv("COLUMNS", "40")
    with pytest.raises(SystemExit) as exit_info:
        main(["patterns", "show", "s2", "--ctx", "64", "--heads", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "downsampled" in out and "36 of 64" in out
    assert all(len(rows) == 36 for rows in _panels(out))
