"""From result records to what people publish and gate on: tables, comparisons, plots.

Everything here works on saved records alone (no model, no torch):

* ``frame.py``     records as a pandas DataFrame (``scca_eval.read_records``)
* ``grid.py``      arranges records into one grid per task (rows × ctx columns)
* ``reference.py`` published figures shipped as data (``results/reference/*.yaml``)
* ``tables.py``    the paper-style table as markdown, CSV or LaTeX
* ``compare.py``   two sets of records cell by cell, with a paired bootstrap (the CI gate)
* ``plot.py``      perplexity against ctx, one panel per task (matplotlib)
"""

from .compare import Comparison, compare_records
from .frame import read_records, records_frame
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
    "read_records",
    "records_frame",
    "render_tables",
]
