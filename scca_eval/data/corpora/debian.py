"""Pinned Debian packages: fetch them, check them, read files out of them.

A package is pinned by name, version, its file in the archive's pool and that file's
SHA-256 (as the archive's Packages index lists them), so a build reads exactly the bytes
it was made from. It is fetched with ``apt-get download NAME:ARCH=VERSION`` where apt
knows that version, else straight from the Debian mirror over HTTP; either way the file
must match its SHA-256. A version that has left the mirror (after a point release) stays
on snapshot.debian.org under the same pool path.

Reading needs neither dpkg nor a Debian system: a ``.deb`` is an ``ar`` archive whose
``data.tar.xz`` member holds the files, and Python reads both.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import UserError
from ...files import atomic_path

MIRROR = "http://deb.debian.org"


@dataclass(frozen=True)
class Package:
    """One Debian package file, pinned."""

    name: str
    version: str
    pool_path: str  # e.g. pool/main/h/hol-light/hol-light_20230128-1+b1_amd64.deb
    sha256: str

    @property
    def file_name(self) -> str:
        return self.pool_path.rsplit("/", 1)[1]

    @property
    def architecture(self) -> str:
        return self.file_name.rsplit("_", 1)[1].removesuffix(".deb")

    @property
    def url(self) -> str:
        archive = "debian-security" if self.pool_path.startswith("pool/updates/") else "debian"
        return f"{MIRROR}/{archive}/{self.pool_path}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(package: Package, folder: Path, say: Callable[[str], None]) -> Path:
    """The package file in ``folder``: kept from an earlier fetch when its SHA-256 matches,
    else downloaded (apt-get, then the mirror) and checked."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / package.file_name
    if target.is_file() and sha256_of(target) == package.sha256:
        return target
    say(f"fetching {package.name} {package.version}")
    if not (_apt_get_download(package, folder, target) or _http_download(package, target)):
        raise UserError(f"cannot download {package.name} {package.version} (neither apt-get nor {package.url} "
                        f"gave it); if the version has left the mirror, put {package.file_name} from "
                        f"https://snapshot.debian.org (same pool path) into {folder} and build again")
    found = sha256_of(target)
    if found != package.sha256:
        target.unlink()
        raise UserError(f"{package.file_name}: SHA-256 {found[:16]}… is not the pinned {package.sha256[:16]}…; "
                        "the download is damaged or not the pinned version: build again")
    return target


def _apt_get_download(package: Package, folder: Path, target: Path) -> bool:
    if shutil.which("apt-get") is None:
        return False
    spec = f"{package.name}:{package.architecture}" if package.architecture != "all" else package.name
    result = subprocess.run(["apt-get", "download", "-q", f"{spec}={package.version}"], cwd=folder,
                            capture_output=True, text=True)
    if result.returncode != 0:
        return False
    # apt writes an epoch's colon as %3a; the pool file name has no epoch at all.
    for candidate in folder.glob(f"{package.name}_*.deb"):
        if candidate != target and sha256_of(candidate) == package.sha256:
            candidate.replace(target)
    return target.is_file()


def _http_download(package: Package, target: Path) -> bool:
    try:
        with urllib.request.urlopen(package.url, timeout=60) as response, atomic_path(target) as partial:
            with open(partial, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- reading a .deb

def _data_member(deb: Path) -> tuple[int, int]:
    """Offset and size of ``data.tar.xz`` inside the ``ar`` archive ``deb``."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise UserError(f"{deb}: not a Debian package (no ar header); delete it and build again")
        while True:
            header = handle.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            if name == "data.tar.xz":
                return handle.tell(), size
            handle.seek(size + (size & 1), 1)  # members are padded to an even length
    raise UserError(f"{deb}: no data.tar.xz member; delete it and build again")


class _Slice:
    """A read-only file object over part of a file (the data member of a .deb)."""

    def __init__(self, path: Path, offset: int, size: int):
        self._handle = open(path, "rb")
        self._handle.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._handle.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._handle.close()


def read_files(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of the package whose path (``/usr/...``) ``wanted`` accepts,
    in path order. Links are left out: what they point to is a file of its own."""
    offset, size = _data_member(deb)
    stream = _Slice(deb, offset, size)
    found = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|xz") as tar:
            for member in tar:
                path = "/" + member.name.removeprefix("./")
                if member.isfile() and wanted(path):
                    found[path] = tar.extractfile(member).read()
    finally:
        stream.close()
    return dict(sorted(found.items()))
