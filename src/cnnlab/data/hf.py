"""The `hf` data set: a Hugging Face `datasets` image-classification set, saved with `save_to_disk` or
in the local cache (never downloaded). Needs the optional extra: `pip install -e ".[hf]"`.

Images are read by index from the Arrow table (memory-mapped), never copied into Python lists: a
sample is the reference `hf:<image column>:<split>:<row>:<root>`, which `base.read_bytes` resolves through
`read_bytes` here, in any process. Labels come from the Arrow column as one numpy array.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from cnnlab.data._registry import DATASETS
from cnnlab.data.base import DataFileError, DataSource, ImageSet
from cnnlab.errors import InputError

PREFIX = "hf:"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
LABEL_NAMES = ("label", "labels", "class", "target", "fine_label", "category")


class HFError(InputError, ValueError):
    """A Hugging Face data set cnnlab cannot use as an image-classification set."""


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # no network at run time: the cache or a saved folder
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise HFError("data.name=hf needs the Hugging Face `datasets` package: pip install -e \".[hf]\"") from None
    datasets.disable_progress_bars()
    return datasets


@lru_cache(maxsize=8)
def _open(root: str) -> dict:
    """{split name as saved: Dataset} of a saved folder or a cached data set name."""
    ds = _datasets()
    try:
        if Path(root).exists():
            d = ds.load_from_disk(root)
        else:
            d = ds.load_dataset(root)
    except FileNotFoundError as e:
        raise HFError(f"data.root={root!r}: not a folder written by save_to_disk, nor a data set in the local "
                      f"Hugging Face cache ({e}); cnnlab never downloads: load it once with datasets.load_dataset "
                      "and save_to_disk, or point data.root at the folder") from None
    except Exception as e:  # datasets raises its own errors for a damaged folder or an offline miss
        raise HFError(f"data.root={root!r}: cannot open it as a Hugging Face data set "
                      f"({type(e).__name__}: {e})") from None
    return dict(d) if isinstance(d, ds.DatasetDict) else {"train": d}


def _rows(d) -> np.ndarray | None:
    """The table rows a Dataset's rows map to (after select/shuffle), or None for the identity."""
    return None if d._indices is None else d._indices.column(0).to_numpy()


def read_bytes(ref: str) -> bytes:
    """The encoded image bytes of `hf:<image column>:<split>:<row>:<root>` (or the file its `path` names)."""
    column, split, row, root = ref[len(PREFIX):].split(":", 3)
    d = _open(root)[split]
    col = d.data.column(column)
    i = int(row)
    rows = _rows(d)
    item = col[int(rows[i]) if rows is not None else i].as_py()
    if isinstance(item, dict):
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path"):
            return Path(item["path"]).read_bytes()
    raise DataFileError(f"{ref}: row {i} of split {split!r} holds no image bytes nor path")


def stamp(ref: str) -> str:
    """What identifies a sample's content for the decoded cache: the split's fingerprint and the row."""
    _, split, row, root = ref[len(PREFIX):].split(":", 3)
    return f"{_open(root)[split]._fingerprint}|{row}"


def _image_column(d, given: str | None) -> str:
    ds = _datasets()
    if given is not None:
        if given not in d.features:
            raise HFError(f"data.options.image_column={given!r} is not a column ({', '.join(d.features)})")
        return given
    found = [k for k, f in d.features.items() if isinstance(f, ds.Image)]
    if not found:
        raise HFError(f"no Image column among {', '.join(d.features)}; set data.options.image_column")
    return found[0]


def _labels(d, given: str | None, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """(labels (N,) int64, class names) from the Arrow column: a ClassLabel's names, whole numbers as they
    are, or text labels sorted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ds = _datasets()
    if given is None:
        given = next((k for k, f in d.features.items() if isinstance(f, ds.ClassLabel)), None) or \
            next((k for k in LABEL_NAMES if k in d.features), None)
        if given is None:
            raise HFError(f"no label column among {', '.join(d.features)} (a ClassLabel, or one named "
                          f"{' / '.join(LABEL_NAMES)}); set data.options.label_column")
    elif given not in d.features:
        raise HFError(f"data.options.label_column={given!r} is not a column ({', '.join(d.features)})")
    col = d.data.column(given)
    rows = _rows(d)
    if rows is not None:
        col = col.take(pa.array(rows))
    feat = d.features[given]
    if pa.types.is_integer(col.type):
        labels = col.to_numpy().astype(np.int64)
        names = classes or (list(feat.names) if isinstance(feat, ds.ClassLabel) else
                            [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)])
        return labels, [str(n) for n in names]
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise HFError(f"label column {given!r} holds {col.type}, not whole numbers or text")
    names = [str(c) for c in classes] if classes else sorted(pc.unique(col).to_pylist())
    idx = pc.index_in(col, value_set=pa.array(names)).to_numpy(zero_copy_only=False)
    if np.isnan(idx.astype(float)).any():
        raise HFError(f"label column {given!r} holds labels that are not in data.options.classes")
    return idx.astype(np.int64), names


@DATASETS.register("hf")
def hf(root: str | None = None, *, download: bool = False, image_column: str | None = None,
       label_column: str | None = None, classes: list | None = None) -> DataSource:
    """A Hugging Face image-classification data set: `data.root` a folder written by `save_to_disk` (a
    Dataset, or a DatasetDict with train / validation / test) or a data set name in the local cache.
    The image column (an `Image` feature) and the label column (a `ClassLabel`, or one named label,
    labels, class, target) are found, or named in data.options."""
    if root is None:
        raise FileNotFoundError("data.name=hf needs data.root: a folder written by save_to_disk, or a cached "
                                "data set name")
    root = str(Path(root).resolve()) if Path(root).exists() else root
    sets = _open(root)
    known = [k for k in sets if k in SPLIT_NAMES]
    if "train" not in [SPLIT_NAMES[k] for k in known]:
        raise HFError(f"data.root={root!r}: splits {sorted(sets)}, none of them train")
    known.sort(key=lambda k: SPLIT_NAMES[k] != "train")  # train first: its classes name the others'
    names = [str(c) for c in classes] if classes is not None else None
    out: dict[str, ImageSet] = {}
    for key in known:
        d = sets[key]
        col = _image_column(d, image_column)
        labels, found = _labels(d, label_column, names)
        names = names or found
        files = [f"{PREFIX}{col}:{key}:{i}:{root}" for i in range(len(d))]
        out[SPLIT_NAMES[key]] = ImageSet(labels=labels, classes=names, files=files)
    return DataSource(train=out["train"], val=out.get("val"), test=out.get("test"), classes=names,
                      description=f"Hugging Face data set {root}")
