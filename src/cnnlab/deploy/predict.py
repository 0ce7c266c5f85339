"""`cnnlab predict RUN_DIR INPUT...`: classify new images with a trained run.

Inputs stream through (inputs.py): memory stays flat whatever their number. Output: per image the
path and the top-k classes with probabilities, as CSV, JSON or JSON lines (--out, written atomically:
the file appears whole at the end, or not at all) or a table on the terminal.
Exit codes: 0 every input predicted; 3 some inputs skipped (each listed on stderr with the reason,
the rest predicted and written); 2 bad usage (no run folder or checkpoint, no readable input at all:
then nothing is written).
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from cnnlab.deploy import inputs as I
from cnnlab.deploy.classifier import Classifier, load

EXIT_SKIPPED = 3
FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}


def predict_stream(clf: Classifier, items, *, batch_size: int = 256, tta: bool | None = None,
                   skipped: list | None = None, notes: list | None = None, ignored: list | None = None,
                   on_batch=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(ref, probabilities (K,)) for every readable image of `items` (files, folders, zips, globs), in order.
    Unreadable ones go to `skipped` as (ref, reason); `on_batch(refs, pixels, probs)` sees each batch."""
    skipped = [] if skipped is None else skipped
    notes = [] if notes is None else notes
    found = I.expand(items, ignored)
    for b in I.batches(found, batch_size=batch_size, channels=clf.run.channels, size=clf.run.size,
                         resize=clf.transform.resize):
        skipped.extend(b.skipped)
        notes.extend(b.notes)
        if not b.refs:
            continue
        probs = clf.probabilities(clf.logits(b.pixels, tta=tta))  # calibrated when the run has a temperature
        if on_batch is not None:
            on_batch(b.refs, b.pixels, probs)
        yield from zip(b.refs, probs)


class Writer:
    """Rows to a temporary file beside `out`, moved over it by `close()`; `abort()` removes it."""

    def __init__(self, out: Path, classes: list[str], top_k: int):
        self.out, self.classes, self.k = out, classes, top_k
        self.fmt = FORMATS.get(out.suffix.lower())
        if self.fmt is None:
            raise ValueError(f"--out {out}: use a .csv, .json or .jsonl file name")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.f = open(self.tmp, "w", newline="", encoding="utf-8")
        self.n = 0
        if self.fmt == "csv":
            self.csv = csv.writer(self.f)
            self.csv.writerow(["path", *[c for i in range(1, top_k + 1) for c in (f"class_{i}", f"prob_{i}")]])
        elif self.fmt == "json":
            self.f.write("[")

    def write(self, ref: str, top: list[tuple[str, float]]) -> None:
        if self.fmt == "csv":
            self.csv.writerow([ref, *[v for c, p in top for v in (c, f"{p:.8f}")]])
        else:
            obj = json.dumps({"path": ref, "class": top[0][0], "prob": round(top[0][1], 8),
                              "top": [{"class": c, "prob": round(p, 8)} for c, p in top]})
            self.f.write(obj + "\n" if self.fmt == "jsonl" else ("\n" if self.n == 0 else ",\n") + obj)
        self.n += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.f.write("\n]\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _top(probs: torch.Tensor, classes: list[str], k: int) -> list[tuple[str, float]]:
    p, i = probs.topk(k)
    return [(classes[j], float(q)) for j, q in zip(i.tolist(), p.tolist())]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(args) -> int:
    """The `cnnlab predict` handler (thin: cnnlab.load + predict_stream + a writer)."""
    err = sys.stderr
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
    clf = load(args.run_dir, checkpoint=args.checkpoint)
    k = min(args.top_k, len(clf.classes))
    out = Path(args.out) if args.out else None
    writer = Writer(out, clf.classes, k) if out else None
    page_path = (out.with_suffix(".html") if out else Path("predictions.html")) if args.gradcam else None
    cams = None
    if args.gradcam:
        from cnnlab.deploy.page import CamCollector

        cams = CamCollector(clf, limit=args.gradcam_limit)
    skipped, notes, ignored = [], [], []
    progress = None
    if out is not None:
        from tqdm import tqdm

        progress = tqdm(unit=" img", file=err, disable=None, mininterval=1.0, desc="predict")

    def on_batch(refs, pixels, probs):
        if cams is not None:
            cams.add(refs, pixels, probs, k)
        if progress is not None:
            progress.update(len(refs))

    n = 0
    width = None
    try:
        for ref, probs in predict_stream(clf, args.inputs, batch_size=args.batch_size, tta=args.tta or None,
                                         skipped=skipped, notes=notes, ignored=ignored, on_batch=on_batch):
            top = _top(probs, clf.classes, k)
            if writer is not None:
                writer.write(ref, top)
            else:
                width = width or max(30, min(60, len(ref) + 2))
                print(f"{ref:<{width}} " + "  ".join(f"{c} {100 * p:5.1f}%" for c, p in top), flush=n < 50)
            n += 1
        if writer is not None:
            writer.close() if n else writer.abort()  # nothing predicted: an existing file stays as it was
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if progress is not None:
            progress.close()
    for ref, why in skipped:
        print(f"cnnlab: skipped {ref}: {why}", file=err)
    for ref, what in notes[:20]:
        print(f"cnnlab: note: {ref}: {what}", file=err)
    if len(notes) > 20:
        print(f"cnnlab: note: ... and {len(notes) - 20} more images converted", file=err)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 5 else "")
        print(f"cnnlab: note: ignored files without an image extension in the folders/zips: {shown}", file=err)
    if cams is not None and n:
        _write_atomic(page_path, cams.html(str(args.run_dir), skipped))
    where = f" -> {out}" if out and n else ""
    page = f", Grad-CAM page {page_path}" if cams is not None and n else ""
    print(f"cnnlab: predicted {n} image(s){f', skipped {len(skipped)}' if skipped else ''} with "
          f"{clf.run.checkpoint}.pt of {args.run_dir}{where}{page}", file=err)
    if n == 0:
        raise FileNotFoundError(f"no images found in {' '.join(args.inputs)}" if not skipped else
                                f"none of the {len(skipped)} input(s) could be read; nothing written")
    return EXIT_SKIPPED if skipped else 0
