"""The `csv` data set: images listed in a CSV/TSV manifest (columns path, label[, split]).

Paths are relative to the manifest's folder, members of a zip (`archive.zip::member`, the archive
relative to the manifest too) or absolute. Every row is checked before anything is decoded: a missing
file, an empty label or an unknown split value is refused naming the manifest's line. The COCO-subset
builder's manifest.csv (columns coco_image_id, class, source_file, file) loads as it is.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from cnnlab.data._registry import DATASETS
from cnnlab.data.base import ZIP_SEP, DataSource, ImageSet, _open_zip, split_ref
from cnnlab.errors import InputError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# column names recognised in a header row, first match wins ("file" before the builder's "source_file")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path", "filepath")
LABEL_COLUMNS = ("label", "class", "class_name", "category", "target", "label_name")
SPLIT_COLUMNS = ("split", "subset", "fold_name")


class ManifestError(InputError, ValueError):
    """A manifest that cannot be read: the message names the file and the line."""


def _dialect(path: Path, sample: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        return ","


def _column(header: list[str], given: str | None, names: tuple[str, ...], what: str, path: Path,
            required: bool = True) -> int | None:
    low = [h.strip().lower() for h in header]
    if given is not None:
        if given.lower() not in low:
            raise ManifestError(f"{path}: data.options.{what}_column={given!r} is not a column of the header "
                                f"({', '.join(header)})")
        return low.index(given.lower())
    for n in names:
        if n in low:
            return low.index(n)
    if required:
        raise ManifestError(f"{path}: no {what} column in the header ({', '.join(header)}); name one "
                            f"{' / '.join(names[:4])}, or set data.options.{what}_column")
    return None


def _resolve(ref: str, folder: Path) -> str:
    """A manifest entry as a path cnnlab reads: zip members and relative paths from the manifest's folder."""
    parts = split_ref(ref)
    if parts is not None:
        archive, member = parts
        archive = archive if os.path.isabs(archive) else str(folder / archive)
        return f"{archive}{ZIP_SEP}{member}"
    return ref if os.path.isabs(ref) else str(folder / ref)


def _exists(ref: str) -> bool:
    parts = split_ref(ref)
    if parts is None:
        return os.path.isfile(ref)
    archive, member = parts
    if not os.path.isfile(archive):
        return False
    try:
        _open_zip(archive).getinfo(member)
        return True
    except KeyError:
        return False


def _sorted_classes(names: set[str]) -> list[str]:
    """Class names in order: numerically when every name is a whole number ("2" before "10")."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


@DATASETS.register("csv")
def csv_manifest(root: str | None = None, *, download: bool = False, path_column: str | None = None,
                 label_column: str | None = None, split_column: str | None = None,
                 classes: list | None = None) -> DataSource:
    """Images listed in a CSV or TSV file (`data.root: manifest.csv`): path, label and an optional split
    (train | val | test; valid/validation mean val). A header row names the columns (see PATH_COLUMNS,
    LABEL_COLUMNS, or data.options.path_column / label_column / split_column); without one the columns
    are path, label[, split] in that order. `classes` fixes the class order (default: sorted names)."""
    if root is None:
        raise FileNotFoundError("data.name=csv needs data.root: a CSV or TSV manifest (path,label[,split])")
    path = Path(root)
    if not path.is_file():
        raise FileNotFoundError(f"data.root={root!r}: no such manifest file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    rows = list(csv.reader(text.splitlines(), delimiter=_dialect(path, text[:4096])))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]  # 1-based line numbers
    if not numbered:
        raise ManifestError(f"{path}: the manifest is empty; expected rows of path,label[,split]")
    first = [c.strip().lower() for c in numbered[0][1]]
    if any(c in PATH_COLUMNS + LABEL_COLUMNS for c in first) or path_column or label_column:
        header = numbered.pop(0)[1]
        pi = _column(header, path_column, PATH_COLUMNS, "path", path)
        li = _column(header, label_column, LABEL_COLUMNS, "label", path)
        si = _column(header, split_column, SPLIT_COLUMNS, "split", path, required=split_column is not None)
    else:
        pi, li, si = 0, 1, 2 if len(numbered[0][1]) > 2 else None
    folder = path.parent
    splits: dict[str, tuple[list[str], list[str]]] = {}
    missing = []
    for line, r in numbered:
        need = max(i for i in (pi, li, si) if i is not None)
        if len(r) <= need:
            raise ManifestError(f"{path} line {line}: {len(r)} column(s), expected at least {need + 1} "
                                f"(path, label{', split' if si is not None else ''})")
        ref, label = r[pi].strip(), r[li].strip()
        if not ref:
            raise ManifestError(f"{path} line {line}: the path is empty")
        if not label:
            raise ManifestError(f"{path} line {line}: {ref!r} has an empty label")
        split = "train"
        if si is not None:
            value = r[si].strip()
            if value.lower() not in SPLIT_NAMES:
                raise ManifestError(f"{path} line {line}: split {value!r} is not one of train, val, test "
                                    "(valid and validation mean val)")
            split = SPLIT_NAMES[value.lower()]
        file = _resolve(ref, folder)
        if not _exists(file):
            missing.append((line, ref, file))
        files, labels = splits.setdefault(split, ([], []))
        files.append(file)
        labels.append(label)
    if missing:
        line, ref, file = missing[0]
        more = f" (and {len(missing) - 1} more rows, first lines {', '.join(str(m[0]) for m in missing[1:6])})" \
            if len(missing) > 1 else ""
        raise ManifestError(f"{path} line {line}: image {ref!r} not found (looked for {file}){more}; paths are "
                            "relative to the manifest's folder, `archive.zip::member` names a zip member")
    found = set().union(*(set(lb) for _, lb in splits.values()))
    if classes is not None:
        names = [str(c) for c in classes]
        unknown = sorted(found - set(names))
        if unknown:
            raise ManifestError(f"{path}: labels {unknown[:5]} are not in data.options.classes")
    else:
        names = _sorted_classes(found)
    index = {c: i for i, c in enumerate(names)}
    if "train" not in splits:
        raise ManifestError(f"{path}: found splits {sorted(splits)} but no train rows")

    def make(name: str) -> ImageSet | None:
        if name not in splits:
            return None
        files, labels = splits[name]
        return ImageSet(labels=np.array([index[lb] for lb in labels], dtype=np.int64), classes=names, files=files)

    return DataSource(train=make("train"), val=make("val"), test=make("test"), classes=names,
                      description=f"images listed in {path}")
