"""Fetching and opening official data files safely: checksums before use, archive extraction that
cannot write outside its target, and unpickling that admits numpy arrays and plain values only.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import shutil
import stat
import tarfile
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from cnnlab.errors import InputError


class ChecksumError(InputError, ValueError):
    """A file's hash differs from the published one; it is never extracted or read."""


class UnsafeArchiveError(InputError, ValueError):
    """An archive member would land outside the target folder (absolute path, `..`, outside link)."""


class UnsafePickleError(InputError, pickle.UnpicklingError, ValueError):
    """A pickle asked for a global other than numpy array reconstruction or a plain builtin type."""


class DownloadError(InputError, OSError):
    """No mirror could be reached (network down, URL gone)."""


# ----------------------------------------------------------------------------------------------
# Checksums and downloads


def file_hash(path: str | Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: str | Path, *, sha256: str | None = None, md5: str | None = None) -> None:
    """Raise ChecksumError (naming the file and both hashes) unless `path` has the given hash."""
    if not sha256 and not md5:
        raise ValueError(f"verify({path}): give sha256= or md5=; files are never used unchecked")
    algo, expected = ("sha256", sha256) if sha256 else ("md5", md5)
    actual = file_hash(path, algo)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path}: {algo} is {actual}, expected {expected}. The file is damaged, incomplete or not the "
            "official one; it was not extracted or read. Delete it and download it again.")


def _fetch(url: str, dest: Path) -> None:
    """Stream `url` to `dest` (the only function that touches the network; tests replace it)."""
    req = urllib.request.Request(url, headers={"User-Agent": "cnnlab"})
    with urllib.request.urlopen(req, timeout=60) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f, length=1 << 20)


def download(url: str | list[str], dest: str | Path, *, sha256: str | None = None,
             md5: str | None = None) -> Path:
    """Download `url` (or the first of several mirrors that works) to `dest` and verify its hash.

    `dest` is a file path, or an existing folder (the URL's file name is used). A file already
    there with the right hash is kept. The file only appears under its final name once verified.
    """
    if not sha256 and not md5:
        raise ValueError(f"download({url}): give sha256= or md5=; downloads are always verified")
    urls = [url] if isinstance(url, str) else list(url)
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / urls[0].rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file():
        try:
            verify(dest, sha256=sha256, md5=md5)
            return dest
        except ChecksumError:
            dest.unlink()  # a partial or stale copy: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    errors = []
    for u in urls:
        try:
            _fetch(u, part)
            break
        except OSError as e:  # URLError is an OSError
            errors.append(f"{u}: {e}")
    else:
        part.unlink(missing_ok=True)
        raise DownloadError(f"could not download {dest.name}: {'; '.join(errors)}. Fetch it by hand into "
                            f"{dest.parent}; it is checked against its published checksum before use")
    try:
        verify(part, sha256=sha256, md5=md5)
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        raise ChecksumError(str(e).replace(str(part), f"{dest} (from {u})")) from None
    part.replace(dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Archives


def _inside(target: Path, rel: str) -> bool:
    """Whether `rel` (a path relative to `target`) stays inside `target` once normalised."""
    full = os.path.normpath(os.path.join(target, rel))
    return full == str(target) or full.startswith(str(target) + os.sep)


def _unsafe_name(name: str) -> str | None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in p.parts:
        return "'..' in path"
    return None


def _check_member(target: Path, name: str, link: str | None, hard: bool) -> None:
    why = _unsafe_name(name)
    if why is None and link is not None:
        if os.path.isabs(link) or _unsafe_name(link) == "absolute path":
            why = f"link to absolute path {link!r}"
        else:  # symlinks resolve from the member's folder, hard links from the archive root
            rel = link if hard else os.path.join(os.path.dirname(name), link)
            if not _inside(target, rel):
                why = f"link {link!r} points outside the target"
    if why is None and not _inside(target, name):
        why = "path leaves the target"
    if why:
        raise UnsafeArchiveError(f"refusing to extract: member {name!r}: {why}; nothing was extracted")


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a zip or tar(.gz/.bz2/.xz) into `target`, after checking every member.

    Refused before anything is written: absolute paths, `..` entries, links pointing outside the
    target, device files. Tar extraction also runs through tarfile's `filter="data"`.
    """
    archive, target = Path(archive), Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                link = None
                if stat.S_ISLNK(info.external_attr >> 16):
                    link = zf.read(info).decode("utf-8", "replace")
                _check_member(target, info.filename, link, hard=False)
            zf.extractall(target)
        return target
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{archive}: neither a zip nor a tar archive ({e})") from None
    with tf:
        for m in tf.getmembers():
            if m.ischr() or m.isblk() or m.isfifo():
                raise UnsafeArchiveError(f"refusing to extract: member {m.name!r} is a device or fifo")
            _check_member(target, m.name, m.linkname if (m.issym() or m.islnk()) else None, hard=m.islnk())
        if hasattr(tarfile, "data_filter"):
            tf.extractall(target, filter="data")
        else:  # pragma: no cover - Python without PEP 706; the checks above still ran
            tf.extractall(target)
    return target


# ----------------------------------------------------------------------------------------------
# Pickles (CIFAR's python release)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover
        from numpy.core import multiarray as ma
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    try:
        from numpy._core.numeric import _frombuffer  # what protocol-5 pickles of arrays name
    except ImportError:  # pragma: no cover
        from numpy.core.numeric import _frombuffer
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = _frombuffer
    for name in ("bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict",
                 "set", "frozenset", "slice", "range"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(text, "latin1")
    import codecs
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose only globals are numpy array reconstruction and plain builtin types."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            where = getattr(self, "_where", "pickle")
            raise UnsafePickleError(
                f"{where}: refusing to load global {module}.{name}; only numpy arrays and plain values are "
                "allowed (the file is not an official data file, or it was tampered with)") from None


def restricted_load(file: str | Path | IO[bytes], *, encoding: str = "latin1") -> Any:
    """Unpickle `file` admitting only numpy arrays and plain values; anything else raises
    UnsafePickleError before it can run. `encoding="latin1"` reads Python 2 pickles (CIFAR)."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            return restricted_load(f, encoding=encoding)
    u = RestrictedUnpickler(file, encoding=encoding)
    u._where = getattr(file, "name", "pickle")
    return u.load()


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    return restricted_load(io.BytesIO(data), encoding=encoding)
