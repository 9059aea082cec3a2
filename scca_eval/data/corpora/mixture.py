"""The recipe of the ``mixture`` corpus: which texts of which pinned Debian packages, in
which domain and split, and how each is cut out.

Five domains, after RedPajama's: public-domain books, LaTeX sources, long source files,
formal mathematics and technical prose. The validation split holds whole works, folders
or packages that the training split does not (named in :func:`parts` below), so the two
share no file; the build then removes what they still share (see ``build.py``).

Nothing here is taken from where the evaluation samples come from: the Coq files of
``theories/Arith/`` and ``theories/Reals/RIneq.v``, mathcomp's ``algebra/ssralg.v``,
HOL Light's ``Multivariate/`` (its ``realanalysis.ml``), set.mm's part "Basic algebraic
structures" (its group homomorphisms), amsmath's ``testmath.tex``, Go's test data
(Newton's Opticks) and the two Austen novels of ``pg19_sample`` are left out.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import SPLITS
from .debian import Package, read_files
from .readers import (dictd_text, info_text, osis_to_text, r_character_vector, sword_entries, text_of,
                      without_coq_licence)

NAME = "mixture"
DOMAINS = ("books", "latex", "code", "formal_math", "technical_prose")
__all__ = ["DOMAINS", "NAME", "PACKAGES", "SPLITS", "Part", "package_files", "parts"]


def _pin(name: str, version: str, pool_path: str, sha256: str) -> tuple[str, Package]:
    return name, Package(name, version, pool_path, sha256)


# Debian 12 (bookworm) main, as its Packages index lists them.
PACKAGES: dict[str, Package] = dict([
    _pin("r-cran-janeaustenr", "1.0.0-1", "pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
         "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
    _pin("sword-text-kjv", "14.3-1", "pool/main/s/sword-text-kjv/sword-text-kjv_14.3-1_all.deb",
         "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57"),
    _pin("sword-comm-tdavid", "2.1-1", "pool/main/s/sword-comm-tdavid/sword-comm-tdavid_2.1-1_all.deb",
         "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"),
    _pin("sword-comm-mhcc", "2.0-1", "pool/main/s/sword-comm-mhcc/sword-comm-mhcc_2.0-1_all.deb",
         "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
    _pin("sword-comm-scofield", "2.1-1", "pool/main/s/sword-comm-scofield/sword-comm-scofield_2.1-1_all.deb",
         "0c11a9533d4870ec40cc72792ecde8aae6e4cc00eca12301150aac018fd5dfcb"),
    _pin("dict-devil", "1.0-13.1", "pool/main/d/dict-devil/dict-devil_1.0-13.1_all.deb",
         "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154"),
    _pin("texlive-latex-base-doc", "2022.20230122-3",
         "pool/main/t/texlive-base/texlive-latex-base-doc_2022.20230122-3_all.deb",
         "122dbbe00bd22f872b1837eb86bd76fbac6ec84dd4f5f0c76cc9c18484485848"),
    _pin("texlive-latex-recommended-doc", "2022.20230122-3",
         "pool/main/t/texlive-base/texlive-latex-recommended-doc_2022.20230122-3_all.deb",
         "8bea1f81bf50354fa4f3046c2dbb82efba9b8520aca0b2ab12eed18554a66c11"),
    _pin("texlive-metapost-doc", "2022.20230122-3",
         "pool/main/t/texlive-base/texlive-metapost-doc_2022.20230122-3_all.deb",
         "72dfff342c161c075a9f20369cc9a06fa82fa767e439503329e8b1ccd8f40c78"),
    _pin("texlive-science-doc", "2022.20230122-4",
         "pool/main/t/texlive-extra/texlive-science-doc_2022.20230122-4_all.deb",
         "0e0fcc74646b916402124e8394a7a8d896e1c959cd9b184b0d7a61e08c6e72db"),
    _pin("texlive-humanities-doc", "2022.20230122-4",
         "pool/main/t/texlive-extra/texlive-humanities-doc_2022.20230122-4_all.deb",
         "b9ff3e33bfad812999000ae009d701d867701afad144433c36a78322f3d88e33"),
    _pin("texlive-publishers-doc", "2022.20230122-4",
         "pool/main/t/texlive-extra/texlive-publishers-doc_2022.20230122-4_all.deb",
         "9b632913d4b0d0871bef41c414fc7ce1167e3bacb55b140901df0c95df1c5765"),
    _pin("golang-1.19-src", "1.19.8-2", "pool/main/g/golang-1.19/golang-1.19-src_1.19.8-2_all.deb",
         "2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a"),
    _pin("libpython3.11-stdlib", "3.11.2-6+deb12u8",
         "pool/main/p/python3.11/libpython3.11-stdlib_3.11.2-6+deb12u8_amd64.deb",
         "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca"),
    _pin("perl-modules-5.36", "5.36.0-7+deb12u3", "pool/main/p/perl/perl-modules-5.36_5.36.0-7+deb12u3_all.deb",
         "3d237ccb1ea32727b6573d43c67d78337aa928a81148d36cef54b369a07c240a"),
    _pin("libcoq-stdlib", "8.16.1+dfsg-1+b2", "pool/main/c/coq/libcoq-stdlib_8.16.1+dfsg-1+b2_amd64.deb",
         "8041ed20fb162a30553e273d9d3e8a3e67d97e08020b604af2402cc4be2e6431"),
    _pin("libcoq-mathcomp-ssreflect", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-ssreflect_1.15.0-1+b4_amd64.deb",
         "559029aeebb8209270d20b0b0e120e06b971ec8f604541202378df6cf9d32bd1"),
    _pin("libcoq-mathcomp-fingroup", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-fingroup_1.15.0-1+b4_amd64.deb",
         "931733a89d9086ec404b4a4a82a77122b26c9fe3aa47cd47fb306b608ac2ce02"),
    _pin("libcoq-mathcomp-algebra", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-algebra_1.15.0-1+b4_amd64.deb",
         "746b0143c9afd996770867f0332bc5986b04ebcfd49790a779efa818bdc43f8c"),
    _pin("libcoq-mathcomp-solvable", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-solvable_1.15.0-1+b4_amd64.deb",
         "5a239ed1cea683eea7152cadde2c13714510df1297854980bbd2fea451ba09f0"),
    _pin("libcoq-mathcomp-field", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-field_1.15.0-1+b4_amd64.deb",
         "4795c8db9f7dda98cbc1ce97bfb0a7cfa669014f1ccb7884e9f080b1eb24f2df"),
    _pin("libcoq-mathcomp-character", "1.15.0-1+b4",
         "pool/main/s/ssreflect/libcoq-mathcomp-character_1.15.0-1+b4_amd64.deb",
         "1cdba6aea09cdcb782922cac7ee94d37e7c936f93823dbcfac412d07a0bb274c"),
    _pin("hol-light", "20230128-1+b1", "pool/main/h/hol-light/hol-light_20230128-1+b1_amd64.deb",
         "9e908b3bf1e689769deee58f85df1cfc89b95aef00dcca087d65c89cd9020dfe"),
    _pin("metamath-databases", "0.0.0~20210101.git55fe226-2",
         "pool/main/m/metamath-databases/metamath-databases_0.0.0~20210101.git55fe226-2_all.deb",
         "c72523c221db6c1039fa909150f9c53fb9175809792f2e80e55e1baa965445a1"),
    _pin("python3.11-doc", "3.11.2-6+deb12u8", "pool/main/p/python3.11/python3.11-doc_3.11.2-6+deb12u8_all.deb",
         "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
    _pin("perl-doc", "5.36.0-7+deb12u3", "pool/main/p/perl/perl-doc_5.36.0-7+deb12u3_all.deb",
         "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591"),
    _pin("git-doc", "1:2.39.5-0+deb12u3", "pool/main/g/git/git-doc_2.39.5-0+deb12u3_all.deb",
         "3c89668a11053a6bafade3de1f611f4613db31e082af63f43d8c5b69ad8795ec"),
    _pin("dict-jargon", "4.4.7-3.1", "pool/main/d/dict-jargon/dict-jargon_4.4.7-3.1_all.deb",
         "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1"),
    _pin("dict-foldoc", "20230119-1", "pool/main/d/dict-foldoc/dict-foldoc_20230119-1_all.deb",
         "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"),
    _pin("coreutils", "9.1-1", "pool/main/c/coreutils/coreutils_9.1-1_amd64.deb",
         "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091"),
])


@dataclass(frozen=True)
class Part:
    """One text of the corpus. Documents are made per (split, domain, group), the parts
    joined in order; ``row`` is the line of the sources table the part is counted in."""

    split: str
    domain: str
    group: str
    package: str
    path: str      # the file in the package (with what of it is taken, where not all)
    row: str       # the path pattern its sources-table row names
    licence: str
    text: str


Files = Callable[[str, Callable[[str], bool]], dict[str, bytes]]


def package_files(debs: dict[str, Path]) -> Files:
    """``files(package, wanted)``: the package's files whose path ``wanted`` accepts."""
    return lambda package, wanted: read_files(debs[package], wanted)


# ---------------------------------------------------------------- books

# Offsets (start, length) of the novels in janeaustenr's lazy-load database data/Rdata.rdb,
# as data/Rdata.rdx lists them. Pride and Prejudice and Persuasion are pg19_sample's.
_AUSTEN = {
    "austen_emma": ("emma", 0x0, 0x55F2B),
    "austen_mansfield_park": ("mansfieldpark", 0x55F2B, 0x55C8D),
    "austen_northanger_abbey": ("northangerabbey", 0xABBB8, 0x2AC5C),
    "austen_sense_and_sensibility": ("sensesensibility", 0x145DFB, 0x4113C),
}
_PUBLIC_DOMAIN = "public domain"

# SWORD modules: (package, module folder, zCom4's 4-byte entry sizes, group, licence note).
_SWORD = [
    ("sword-text-kjv", "/usr/share/sword/modules/texts/ztext/engKJV2006eb", False, "kjv_bible",
     "public domain (Crown copyright in the UK)"),
    ("sword-comm-tdavid", "/usr/share/sword/modules/comments/zcom/tdavid", True, "spurgeon_treasury_of_david",
     _PUBLIC_DOMAIN),
    ("sword-comm-mhcc", "/usr/share/sword/modules/comments/zcom/mhcc", False, "henry_concise_commentary",
     _PUBLIC_DOMAIN),
    ("sword-comm-scofield", "/usr/share/sword/modules/comments/zcom/scofield", False, "scofield_notes_1917",
     _PUBLIC_DOMAIN),
]


def _books(files: Files) -> Iterator[Part]:
    rdb_path = "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    rdb = files("r-cran-janeaustenr", lambda p: p == rdb_path)[rdb_path]
    for group, (name, start, length) in _AUSTEN.items():
        text = "\n".join(r_character_vector(rdb[start:start + length])).strip("\n") + "\n"
        yield Part("train", "books", group, "r-cran-janeaustenr", f"{rdb_path} (object {name})", rdb_path,
                   "public domain (package: MIT)", text)
    for package, folder, wide, group, licence in _SWORD:
        module = files(package, lambda p: p.startswith(folder + "/"))
        yield Part("train", "books", group, package, folder + "/", folder + "/", licence,
                   osis_to_text(sword_entries(module, folder, wide)))
    dictd = files("dict-devil", lambda p: p.startswith("/usr/share/dictd/devil."))
    yield Part("validation", "books", "bierce_devils_dictionary", "dict-devil", "/usr/share/dictd/devil.dict.dz",
               "/usr/share/dictd/devil.dict.dz", _PUBLIC_DOMAIN,
               dictd_text(dictd["/usr/share/dictd/devil.dict.dz"], dictd["/usr/share/dictd/devil.index"]))


# ---------------------------------------------------------------- LaTeX

_TEXLIVE_DOCS = ("texlive-latex-base-doc", "texlive-latex-recommended-doc", "texlive-metapost-doc",
                 "texlive-science-doc", "texlive-humanities-doc", "texlive-publishers-doc")
_TEX_SOURCE = re.compile(r"\.(tex|dtx|ltx)(\.gz)?$")
# TeX Catalogue licence keys that allow redistribution (every key of a package must be one).
_FREE_TEX_LICENCES = re.compile(r"^(lppl[0-9.a-c]*|gpl[0-9.+]*|lgpl[0-9.+]*|fdl|gfl|gfsl|ofl|pd|mit|x11|isc|"
                                r"bsd[0-9]?|apache2|artistic2?|cc0|cc-by-[0-9]|cc-by-sa-[0-9]|knuth)$")
_LATEX_EXCLUDED = {"/usr/share/doc/texlive-doc/latex/amsmath/testmath.tex"}  # proof_pile_sample's


def _ctan_licences(licenses_file: str) -> dict[str, tuple[str, str]]:
    """Documentation folder (``/usr/share/doc/texlive-doc/KIND/PKG``) -> (CTAN package,
    licence keys), from the package's ``Licenses`` list (TeX Catalogue data)."""
    folders, package, licence = {}, None, ""
    for line in licenses_file.splitlines():
        header = re.match(r"^([A-Za-z0-9_.+-]+): ?(.*)$", line)
        if header:
            package, licence = header.group(1), header.group(2).strip()
        elif line.startswith("texmf-dist/doc/") and line.endswith("/*") and package is not None:
            folders["/usr/share/doc/texlive-doc/" + line[len("texmf-dist/doc/"):-2]] = (package, licence)
    return folders


def _licence_of(path: str, folders: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """(documentation folder, CTAN package, licence) of a file: its folder's entry, or that of
    the nearest folder above it (sub-folders belong to their package)."""
    folder = path.rsplit("/", 1)[0]
    while folder.startswith("/usr/share/doc/texlive-doc/"):
        if folder in folders:
            return (folder, *folders[folder])
        folder = folder.rsplit("/", 1)[0]
    return None


def is_validation_ctan_package(name: str) -> bool:
    """About 1 in 28 CTAN packages, drawn by a hash of the name, is validation text."""
    return hashlib.sha256(name.encode()).digest()[0] < 9


def _latex(files: Files) -> Iterator[Part]:
    for package in _TEXLIVE_DOCS:
        licences_path = f"/usr/share/doc/{package}/Licenses.gz"
        found = files(package, lambda p: p == licences_path or
                      (p.startswith("/usr/share/doc/texlive-doc/") and bool(_TEX_SOURCE.search(p))))
        folders = _ctan_licences(text_of(found.pop(licences_path), licences_path))
        for path, data in found.items():
            owner = _licence_of(path, folders)
            if path.removesuffix(".gz") in _LATEX_EXCLUDED or owner is None:
                continue
            folder, ctan, licence = owner
            if not licence or not all(_FREE_TEX_LICENCES.match(key) for key in licence.split()):
                continue
            split = "validation" if is_validation_ctan_package(ctan) else "train"
            yield Part(split, "latex", package, package, path, folder + "/",
                       f"{licence} (CTAN {ctan})", text_of(data, path))


# ---------------------------------------------------------------- code

_LONG_SOURCE = 16_384  # bytes: "long source files"
_GO_SRC = "/usr/share/go-1.19/src/"


def _generated(text: str) -> bool:
    # Go's convention for machine-made files (tables, bundles of other packages' code).
    return bool(re.search(r"^// Code generated .* DO NOT EDIT\.$", text[:4000], flags=re.M))


def _code(files: Files) -> Iterator[Part]:
    go = files("golang-1.19-src", lambda p: p.startswith(_GO_SRC) and p.endswith(".go")
               and not p.endswith("_test.go") and "/testdata/" not in p and "/vendor/" not in p
               and not p.startswith(_GO_SRC + "cmd/"))
    for path, data in go.items():
        text = text_of(data, path)
        if len(data) < _LONG_SOURCE or _generated(text):
            continue
        held_out = path.startswith(_GO_SRC + "go/")  # the packages that parse and type-check Go
        yield Part("validation" if held_out else "train", "code", "go", "golang-1.19-src", path,
                   _GO_SRC + ("go/" if held_out else "") + "**/*.go", "BSD-3-Clause (Go)", text)
    python = files("libpython3.11-stdlib", lambda p: p.startswith("/usr/lib/python3.11/") and p.endswith(".py"))
    for path, data in python.items():
        if len(data) >= _LONG_SOURCE:
            yield Part("train", "code", "python", "libpython3.11-stdlib", path, "/usr/lib/python3.11/**/*.py",
                       "PSF-2.0", text_of(data, path))
    perl = files("perl-modules-5.36", lambda p: p.startswith("/usr/share/perl/5.36.0/") and p.endswith(".pm"))
    for path, data in perl.items():
        if len(data) >= _LONG_SOURCE:
            yield Part("train", "code", "perl", "perl-modules-5.36", path, "/usr/share/perl/5.36.0/**/*.pm",
                       "GPL-1+ or Artistic-1", text_of(data, path))


# ---------------------------------------------------------------- formal mathematics

_COQ = "/usr/lib/ocaml/coq/"
_COQ_EXCLUDED = re.compile(r"^/usr/lib/ocaml/coq/theories/(Arith/[^/]*|Reals/RIneq)\.v$")  # proof_pile_sample's
_MATHCOMP = ("ssreflect", "fingroup", "algebra", "solvable", "field", "character")
_HOL = "/usr/share/hol-light/"
_SET_MM = "/usr/share/metamath/databases/set.mm"
_SET_MM_BAR = "#" * 79
# set.mm's parts (the banner titles) taken: six for training, one for validation. The
# part "Basic algebraic structures" holds proof_pile_sample's slice.
_SET_MM_TRAIN = ("(start)", "CLASSICAL FIRST-ORDER LOGIC WITH EQUALITY", "ZF (ZERMELO-FRAENKEL) SET THEORY",
                 "ZFC (ZERMELO-FRAENKEL WITH CHOICE) SET THEORY", "TG (TARSKI-GROTHENDIECK) SET THEORY",
                 "ELEMENTARY NUMBER THEORY")
_SET_MM_VALIDATION = ("BASIC ORDER THEORY",)


def set_mm_parts(text: str) -> list[tuple[str, str]]:
    """set.mm cut at its part banners (a comment opening with a line of 79 '#'): (title, text)."""
    starts = [m.start() + 1 for m in re.finditer(r"\n\$\(\n" + _SET_MM_BAR + r"\n", text)]
    bounds = [0, *starts, len(text)]
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        title = text[start:end].split("\n", 3)[2].strip() if start else "(start)"
        parts.append((title, text[start:end]))
    return parts


def _formal_math(files: Files) -> Iterator[Part]:
    coq = files("libcoq-stdlib", lambda p: p.startswith(_COQ) and p.endswith(".v") and not _COQ_EXCLUDED.match(p))
    for path, data in coq.items():
        yield Part("train", "formal_math", "coq_stdlib", "libcoq-stdlib", path, _COQ + "**/*.v", "LGPL-2.1",
                   without_coq_licence(text_of(data, path), path))
    for library in _MATHCOMP:
        folder = f"{_COQ}user-contrib/mathcomp/{library}/"
        found = files(f"libcoq-mathcomp-{library}", lambda p: p.startswith(folder) and p.endswith(".v")
                      and p != f"{_COQ}user-contrib/mathcomp/algebra/ssralg.v")  # proof_pile_sample's
        split = "validation" if library == "field" else "train"
        for path, data in found.items():
            yield Part(split, "formal_math", "mathcomp", f"libcoq-mathcomp-{library}", path, folder + "*.v",
                       "CeCILL-B", text_of(data, path))
    hol = files("hol-light", lambda p: p.startswith(_HOL) and p.endswith(".ml")
                and (p.count("/") == 4 or p.startswith((_HOL + "Library/", _HOL + "Arithmetic/"))))
    for path, data in hol.items():
        held_out = path.startswith(_HOL + "Arithmetic/")
        row = _HOL + ("Arithmetic/*.ml" if held_out else "*.ml" if path.count("/") == 4 else "Library/*.ml")
        yield Part("validation" if held_out else "train", "formal_math", "hol_light", "hol-light", path, row,
                   "BSD-2-Clause", text_of(data, path))
    set_mm = text_of(files("metamath-databases", lambda p: p == _SET_MM)[_SET_MM], _SET_MM)
    for title, text in set_mm_parts(set_mm):
        split = "train" if title in _SET_MM_TRAIN else "validation" if title in _SET_MM_VALIDATION else None
        if split is not None:
            where = f"{_SET_MM} ({'the text before the first part' if title == '(start)' else 'part ' + title})"
            yield Part(split, "formal_math", "metamath_set_mm", "metamath-databases", where, where, "CC0-1.0", text)


# ---------------------------------------------------------------- technical prose

_PYTHON_DOCS = "/usr/share/doc/python3.11/html/_sources/"
_PERL_POD = "/usr/share/perl/5.36.0/pod/"
_GIT_DOCS = "/usr/share/doc/git-doc/"


def _technical_prose(files: Files) -> Iterator[Part]:
    python = files("python3.11-doc", lambda p: p.startswith(_PYTHON_DOCS) and p.endswith(".rst.txt"))
    for path, data in python.items():
        yield Part("train", "technical_prose", "python_docs", "python3.11-doc", path, _PYTHON_DOCS + "**/*.rst.txt",
                   "PSF-2.0", text_of(data, path))
    pods = files("perl-doc", lambda p: p.startswith(_PERL_POD) and (p.endswith(".pod") or p.endswith(".pod.gz")))
    for path, data in pods.items():
        yield Part("train", "technical_prose", "perl_docs", "perl-doc", path, _PERL_POD + "*.pod",
                   "GPL-1+ or Artistic-1", text_of(data, path))
    git = files("git-doc", lambda p: p.startswith(_GIT_DOCS) and p.endswith(".txt") and p.count("/") == 5)
    for path, data in git.items():
        yield Part("train", "technical_prose", "git_docs", "git-doc", path, _GIT_DOCS + "*.txt", "GPL-2",
                   text_of(data, path))
    for package, name, licence in (("dict-jargon", "jargon", _PUBLIC_DOMAIN),
                                   ("dict-foldoc", "foldoc", "GFDL-1.1+ (no invariant sections)")):
        dictd = files(package, lambda p: p.startswith(f"/usr/share/dictd/{name}."))
        data_path = f"/usr/share/dictd/{name}.dict.dz"
        yield Part("train", "technical_prose", f"{name}_dictionary", package, data_path, data_path, licence,
                   dictd_text(dictd[data_path], dictd[f"/usr/share/dictd/{name}.index"]))
    info = files("coreutils", lambda p: p.startswith("/usr/share/info/coreutils.info"))
    yield Part("validation", "technical_prose", "coreutils_manual", "coreutils", "/usr/share/info/coreutils.info.gz",
               "/usr/share/info/coreutils.info.gz", "GFDL-1.3+ (no invariant sections)",
               info_text([text_of(data, path) for path, data in info.items()]))


def parts(files: Files) -> Iterator[Part]:
    """Every text of the corpus, domain by domain, in a fixed order."""
    yield from _books(files)
    yield from _latex(files)
    yield from _code(files)
    yield from _formal_math(files)
    yield from _technical_prose(files)
