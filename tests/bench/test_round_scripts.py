"""benchmarks/profile_round.sh's `gputests` stage runs every GPU test: the files it names are
the test files that mark tests `gpu`, so a GPU test added elsewhere is not left out of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gputests_stage_names_every_file_with_gpu_tests():
    script = (ROOT / "benchmarks" / "profile_round.sh").read_text(encoding="utf-8")
    stage = script.split("if want gputests; then", 1)[1].split("\nfi", 1)[0]
    named = set(re.findall(r"tests/[\w/]+\.py", stage))
    marked = {str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"mark\.gpu\b", path.read_text(encoding="utf-8"))}
    assert marked and named == marked
