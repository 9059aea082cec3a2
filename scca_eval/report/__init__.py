"""From result records to what people publish and gate on: tables, comparisons, plots.

Everything here works on saved records alone (no model, no torch):

* ``grid.py``      arranges records into one grid per task (rows × ctx columns)
* ``reference.py`` published figures shipped as data (``results/reference/*.yaml``)
* ``tables.py``    the paper-style table as markdown, CSV or LaTeX
* ``compare.py``   two sets of records cell by cell, with a paired bootstrap (the CI gate)
* ``plot.py``      perplexity against ctx, one panel per task (matplotlib, optional)
"""

from .compare import Comparison, compare_records
from .grid import METRICS, ROW_MODES, TaskGrid, build_grids
from .reference import ReferenceSet, list_references, load_reference
from .tables import render_tables

__all__ = [
    "METRICS",
    "ROW_MODES",
    "Comparison",
    "ReferenceSet",
    "TaskGrid",
    "build_grids",
    "compare_records",
    "list_references",
    "load_reference",
    "render_tables",
]
