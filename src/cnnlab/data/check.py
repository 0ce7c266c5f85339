"""Data checks: every problem in a data set as a Finding (error | warning | info) naming the file.

An error is something that would crash training or silently teach the model garbage (unreadable,
truncated, empty or oversized files, labels out of range, classes without training images, duplicate
ids). `fast_check` is the cheap part the trainer runs before step 0; `check` decodes every file.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnlab.data import base
from cnnlab.data.base import DataSource, ImageSet
from cnnlab.data.stats import channels_of, chunked, pool_map
from cnnlab.errors import InputError

SEVERITIES = ("error", "warning", "info")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    # kinds: unreadable, truncated, corrupt, zero_byte, missing, huge, converted, label_range,
    # empty_class, one_class, class_mismatch, duplicate_id, duplicate, duplicate_across_splits
    kind: str
    path: str  # the file, folder or sample id it is about
    message: str
    others: tuple[str, ...] = ()  # related files (the other copies of a duplicate)

    def __str__(self) -> str:
        return f"{self.severity}: {self.kind}: {self.path}: {self.message}"

    def to_dict(self) -> dict:
        return {"severity": self.severity, "kind": self.kind, "path": self.path, "message": self.message,
                "others": list(self.others)}


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def _splits(source: DataSource) -> list[tuple[str, ImageSet]]:
    return [(k, s) for k, s in (("train", source.train), ("val", source.val), ("test", source.test)) if s is not None]


def _class_dir(split: str, s: ImageSet, c: str) -> str:
    """Where class `c` of a split lives (the folder for file-backed sets, `split/class` otherwise)."""
    if s.files:
        return f"{Path(s.files[0]).parent.parent}/{c}"
    return f"{split}/{c}"


def _size(ref: str) -> int | None:
    try:
        if ref.startswith("hf:"):  # a row of a Hugging Face data set: its bytes are in the Arrow table
            return len(base.read_bytes(ref))
        if (parts := base.split_ref(ref)) is not None:
            return base._open_zip(parts[0]).getinfo(parts[1]).file_size
        return os.stat(ref).st_size
    except (OSError, KeyError):
        return None


# ----------------------------------------------------------------------------------------------
# The cheap checks


def fast_check(source: DataSource) -> list[Finding]:
    """Labels in range, empty classes, classes that differ between splits, missing and zero-byte
    files, duplicate ids. No decoding: a second or so for 50,000 files."""
    out: list[Finding] = []
    n_classes = len(source.classes)
    splits = _splits(source)
    counts = {}
    for name, s in splits:
        bad = np.flatnonzero((s.labels < 0) | (s.labels >= n_classes))
        for i in bad:
            out.append(Finding("error", "label_range", s.ids[i],
                               f"{name} label {int(s.labels[i])} is outside 0..{n_classes - 1}"))
        ok = s.labels[(s.labels >= 0) & (s.labels < n_classes)]
        counts[name] = np.bincount(ok, minlength=n_classes)
        for i, n in Counter(s.ids).items():
            if n > 1:
                out.append(Finding("error", "duplicate_id", i, f"appears {n} times in {name}"))
        for ref in s.files or []:
            size = _size(ref)
            if size is None:
                out.append(Finding("error", "missing", ref, "file does not exist"))
            elif size == 0:
                out.append(Finding("error", "zero_byte", ref, "file is empty (0 bytes)"))
    seen = set()
    for name, s in splits:  # ids shared between splits: the same sample trains and evaluates
        for i in set(s.ids) & seen:
            out.append(Finding("error", "duplicate_id", i, f"is in {name} and in an earlier split"))
        seen |= set(s.ids)
    if len(source.classes) == 1:  # trains to 100% and finds no problem: a classifier needs two classes
        out.append(Finding("error", "one_class", _class_dir("train", source.train, source.classes[0]),
                           f"the data set has only 1 class ({source.classes[0]!r}); a classifier needs at least "
                           "2 (one folder per class)"))
    train = counts["train"]
    for ci, c in enumerate(source.classes):
        if train[ci]:
            for name, s in splits[1:]:
                if not counts[name][ci]:
                    out.append(Finding("warning", "class_mismatch", _class_dir(name, s, c),
                                       f"class {c!r} has {train[ci]} train images but none in {name}; "
                                       f"its {name} metrics will be empty"))
            continue
        held = [(name, s) for name, s in splits[1:] if counts[name][ci]]
        if held:
            for name, s in held:
                out.append(Finding("error", "class_mismatch", _class_dir(name, s, c),
                                   f"class {c!r} has {counts[name][ci]} {name} images but no train images "
                                   f"(a misspelt folder?)"))
        else:
            out.append(Finding("error", "empty_class", _class_dir("train", source.train, c),
                               f"class {c!r} has no images; remove the folder or fill it"))
    return out


class DataCheckError(InputError, ValueError):
    """The data has errors that would crash training or teach the model garbage."""


def require_trainable(source: DataSource, *, show: int = 10) -> list[Finding]:
    """`fast_check` for the trainer: raise DataCheckError naming the files when there is an error,
    else return the warnings and info (for the run's notes)."""
    findings = fast_check(source)
    errs = errors(findings)
    if errs:
        lines = "\n".join(f"  {f.kind}: {f.path}: {f.message}" for f in errs[:show])
        more = f"\n  ... and {len(errs) - show} more" if len(errs) > show else ""
        raise DataCheckError(f"the data has {len(errs)} error(s); not training on it:\n{lines}{more}\n"
                             "Fix or remove these files (`cnnlab data check` runs every check), or set "
                             "data.check: false to train anyway.")
    return findings


# ----------------------------------------------------------------------------------------------
# The full check: every file opened, decoded and hashed


def _inspect(args: tuple[list[str], int, int]) -> list[tuple]:
    """Per file: (ref, problem kind or None, message, mode, pixel hash)."""
    refs, channels, max_pixels = args
    out = []
    for ref in refs:
        try:
            data = base.read_bytes(ref)
        except (OSError, KeyError, ValueError) as e:  # ValueError: a damaged zip member (base.DataFileError)
            out.append((ref, "unreadable", f"cannot read the file: {e}", None, None))
            continue
        if not data:
            continue  # reported by fast_check
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(base.NamedBytes(data, ref))  # reads the header only
        except Image.DecompressionBombError as e:
            out.append((ref, "huge", f"{e}; not decoded", None, None))
            continue
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            out.append((ref, "unreadable", f"not an image Pillow can read ({len(data)} bytes): {e}", None, None))
            continue
        w, h = img.size
        if w * h > max_pixels:
            out.append((ref, "huge", f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                     "(Pillow's MAX_IMAGE_PIXELS); loading it would raise or warn of a "
                                     "decompression bomb; not decoded", img.mode, None))
            continue
        try:
            img.load()
            arr = np.asarray(base.to_mode(img, channels), dtype=np.uint8)
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
            kind = "truncated" if "truncat" in str(e) or "broken" in str(e) else "corrupt"
            out.append((ref, kind, f"decoding failed ({type(e).__name__}: {e})", img.mode, None))
            continue
        digest = hashlib.blake2b(repr(arr.shape).encode() + arr.tobytes(), digest_size=16).hexdigest()
        mode = img.mode + ("+alpha" if img.mode == "P" and "transparency" in img.info else "")
        out.append((ref, None, "", mode, digest))
    return out


def _mode_finding(ref: str, mode: str, channels: int) -> Finding | None:
    target = "L" if channels == 1 else "RGB"
    if mode == target:
        return None
    if mode in ALPHA_MODES or mode.endswith("+alpha"):
        return Finding("warning", "converted", ref, f"mode {mode}: transparent pixels are composited on white, "
                                                    f"then converted to {target}")
    if mode in DEEP_MODES:
        return Finding("warning", "converted", ref, f"mode {mode}: values are scaled to 8 bits, then {target}")
    return Finding("info", "converted", ref, f"mode {mode} is converted to {target} when loaded")


def _tensor_hashes(s: ImageSet) -> list[str]:
    x = s.images.contiguous().numpy()
    return [hashlib.blake2b(x[i].tobytes(), digest_size=16).hexdigest() for i in range(len(x))]


def _duplicates(source: DataSource, hashes: dict[str, list[str | None]]) -> list[Finding]:
    out = []
    groups: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # hash -> (split, id, class)
    for name, s in _splits(source):
        for i, h in enumerate(hashes.get(name, [])):
            if h is not None:
                lab = int(s.labels[i])
                groups[h].append((name, s.ids[i], source.classes[lab] if 0 <= lab < len(source.classes) else "?"))
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        splits_in = sorted({m[0] for m in members})
        labels = sorted({m[2] for m in members})
        others = tuple(m[1] for m in members[1:])
        where = " and ".join(splits_in)
        if len(splits_in) > 1:
            kind, msg = "duplicate_across_splits", f"the same image is in {where} ({len(members)} copies)"
        else:
            kind, msg = "duplicate", f"{len(members) - 1} exact copies in {where}"
        if len(labels) > 1:
            msg += f", labelled {' and '.join(labels)}"
        out.append(Finding("warning", kind, first[1], msg + ": " + ", ".join(others[:5])
                           + (f", ... ({len(others)})" if len(others) > 5 else ""), others))
    return out


def check(source: DataSource, *, jobs: int | None = None, max_pixels: int | None = None,
          channels: int | None = None, chunk: int = 500) -> list[Finding]:
    """`fast_check`, then every file opened and decoded in `jobs` processes: unreadable, truncated,
    oversized (header only), converted modes, and exact duplicates (same decoded pixels) within
    and across splits."""
    max_pixels = max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485
    findings = fast_check(source)
    splits = _splits(source)
    files = [f for _, s in splits for f in (s.files or [])]
    channels = channels or (channels_of(files[:20]) if files else 1)
    results: dict[str, tuple] = {}
    work = [(c, channels, max_pixels) for c in chunked(files, chunk)]
    for part in pool_map(_inspect, work, jobs):
        for r in part:
            results[r[0]] = r
    hashes = {}
    for name, s in splits:
        if s.files is None:
            hashes[name] = _tensor_hashes(s)
            continue
        hashes[name] = []
        for ref in s.files:
            r = results.get(ref)
            if r is None:  # zero-byte: reported already
                hashes[name].append(None)
                continue
            _, kind, msg, mode, digest = r
            if kind:
                findings.append(Finding("error", kind, ref, msg))
            elif (f := _mode_finding(ref, mode, channels)) is not None:
                findings.append(f)
            hashes[name].append(digest)
    return findings + _duplicates(source, hashes)


# ----------------------------------------------------------------------------------------------
# Printing


def summary(findings: list[Finding]) -> dict:
    c = Counter(f.severity for f in findings)
    dup = [f for f in findings if f.kind == "duplicate"]
    leak = [f for f in findings if f.kind == "duplicate_across_splits"]
    return {"errors": c["error"], "warnings": c["warning"], "info": c["info"],
            "duplicate_images": sum(len(f.others) for f in dup), "duplicate_groups": len(dup),
            "leaked_images": sum(len(f.others) for f in leak)}


def print_findings(findings: list[Finding], *, limit: int | None = 10, file: TextIO | None = None) -> None:
    """Grouped by severity, then kind; at most `limit` lines per group (None = all)."""
    file = file or sys.stdout
    groups: dict[tuple[str, str], list[Finding]] = defaultdict(list)
    for f in findings:
        groups[(f.severity, f.kind)].append(f)
    for (sev, kind), fs in sorted(groups.items(), key=lambda kv: (SEVERITIES.index(kv[0][0]), kv[0][1])):
        print(f"{sev.upper()} {kind} ({len(fs)})", file=file)
        for f in fs[:limit] if limit else fs:
            print(f"  {f.path}: {f.message}", file=file)
        if limit and len(fs) > limit:
            print(f"  ... and {len(fs) - limit} more (--all lists every one)", file=file)
    s = summary(findings)
    print(f"{s['errors']} errors, {s['warnings']} warnings, {s['info']} info; duplicates: "
          f"{s['duplicate_images']} extra copies in {s['duplicate_groups']} groups within splits, "
          f"{s['leaked_images']} images shared across splits", file=file)
