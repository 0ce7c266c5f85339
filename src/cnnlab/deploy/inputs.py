"""Inputs of `cnnlab predict`: files, folders (recursive), zips and globs as a stream of image refs,
decoded a batch at a time in a thread pool (never the whole list of images in memory), with every
unreadable file set aside with the reason."""
from __future__ import annotations

import glob
import itertools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image, UnidentifiedImageError

from cnnlab.data.base import ZIP_SEP, DataFileError, _open_zip, decode_image, open_image, read_bytes
from cnnlab.data.sources import IMAGE_EXTS

_PLAIN_MODES = {"L", "RGB"}


@dataclass
class Found:
    """One input: an image ref to decode, or a problem that rules it out before decoding."""

    ref: str
    problem: str | None = None


@dataclass
class Batch:
    refs: list[str]  # the decoded ones, in input order
    pixels: torch.Tensor  # uint8 (B, C, S, S)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (ref, what was converted)


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS and not Path(name).name.startswith(".")


def _walk(folder: Path, ignored: list[str]) -> Iterator[Found]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if _is_image_name(f):
                yield Found(os.path.join(root, f))
            elif not f.startswith("."):
                ignored.append(os.path.join(root, f))


def _zip(path: Path, ignored: list[str]) -> Iterator[Found]:
    try:
        names = sorted(_open_zip(str(path)).namelist())
    except Exception as e:  # a damaged archive is one skipped input, not the end of the run
        yield Found(str(path), f"not a readable zip archive ({type(e).__name__}: {e})")
        return
    for n in names:
        if n.endswith("/") or "__MACOSX" in n:
            continue
        if _is_image_name(n):
            yield Found(f"{path}{ZIP_SEP}{n}")
        else:
            ignored.append(f"{path}{ZIP_SEP}{n}")


def _one(path: Path, ignored: list[str]) -> Iterator[Found]:
    if path.is_dir():
        yield from _walk(path, ignored)
    elif path.suffix.lower() == ".zip" and path.is_file():
        yield from _zip(path, ignored)
    else:  # a file named on the command line is always tried, whatever its name
        yield Found(str(path))


def expand(inputs: Iterable[str], ignored: list[str] | None = None) -> Iterator[Found]:
    """Image refs of `inputs` in a stable order (folders and zips sorted/in archive order, globs sorted).
    Files without an image extension inside folders and zips are appended to `ignored`."""
    ignored = [] if ignored is None else ignored
    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.exists():
            yield from _one(p, ignored)
        elif ZIP_SEP in item:
            yield Found(item)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                yield Found(item, "the pattern matches no file")
            for m in matches:
                yield from _one(Path(m), ignored)
        else:
            yield Found(item, "no such file or folder")


def _reason(ref: str, e: Exception) -> str:
    if isinstance(e, DataFileError) and e.__cause__ is not None:  # open_image names the file; say why, once
        e = e.__cause__
    if isinstance(e, Image.DecompressionBombError):
        return f"too large to decode: {e}"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return "a folder, not an image"
    if isinstance(e, UnidentifiedImageError):
        try:
            empty = len(read_bytes(ref)) == 0
        except Exception:
            empty = False
        return "an empty file (0 bytes)" if empty else "not an image (Pillow cannot identify the format)"
    return f"unreadable image ({type(e).__name__}: {e})"


def load_one(ref: str, channels: int, size: int, resize: tuple = ("squash", None)) -> tuple[torch.Tensor | None, str | None, str | None]:
    """(pixels uint8 (C, S, S), None, note) or (None, reason, None)."""
    try:
        img = open_image(ref)
        mode = img.mode
        t = decode_image(img, channels, size, *resize)
    except Exception as e:  # noqa: BLE001 - every unreadable file is one skipped input with its reason
        return None, _reason(ref, e), None
    note = None
    if mode not in _PLAIN_MODES:
        bits = " (16-bit)" if mode.startswith("I;16") else ""
        note = f"{mode}{bits} image converted to {'greyscale' if channels == 1 else 'RGB'}"
    return t, None, note


def batches(found: Iterable[Found], *, batch_size: int, channels: int, size: int,
            threads: int | None = None, ahead: int = 2, resize: tuple = ("squash", None)) -> Iterator[Batch]:
    """Decoded batches of `found` (brought to the square size by `resize`, base.eval_resize), in order; `ahead` batches are decoded while the current one is used,
    so memory holds at most (ahead + 1) batches of pixels whatever the number of inputs."""
    threads = threads or min(8, (os.cpu_count() or 2) * 2)
    it = iter(found)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque = deque()

        def submit() -> bool:
            chunk = list(itertools.islice(it, batch_size))
            if not chunk:
                return False
            futs = [None if f.problem else pool.submit(load_one, f.ref, channels, size, resize) for f in chunk]
            pending.append((chunk, futs))
            return True

        for _ in range(ahead + 1):
            if not submit():
                break
        while pending:
            chunk, futs = pending.popleft()
            submit()
            refs, pix, skipped, notes = [], [], [], []
            for f, fut in zip(chunk, futs):
                if fut is None:
                    skipped.append((f.ref, f.problem))
                    continue
                t, reason, note = fut.result()
                if t is None:
                    skipped.append((f.ref, reason))
                    continue
                refs.append(f.ref)
                pix.append(t)
                if note:
                    notes.append((f.ref, note))
            pixels = torch.stack(pix) if pix else torch.zeros(0, channels, size, size, dtype=torch.uint8)
            yield Batch(refs, pixels, skipped, notes)
