"""`cnnlab data ...`: stats, check, build-mnist-m and coco-subset, thin over the Python API."""
from __future__ import annotations

import argparse
import json
import sys
import time

from cnnlab.errors import InputError


def _options(pairs: list[str]) -> dict:
    from cnnlab.config import parse_value

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise InputError(f"--option {p!r}: expected key=value, e.g. --option fold=0")
        k, v = p.split("=", 1)
        out[k] = parse_value(v)
    return out


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="NAME|PATH", help="a data set name (cifar10, mnist, ...) or a folder / .zip")
    p.add_argument("--root", help="where a named data set's files are (or go when downloaded)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a data-set option (repeatable)")
    p.add_argument("--split", default="train", choices=["train", "val", "test"],
                   help="which split of the data set (default train)")
    p.add_argument("--jobs", type=int, default=None, help="decoding processes (default: every core)")


def _source(args):
    """The data set the command names: a registered name or a folder / .zip path (pipeline.open_source)."""
    from cnnlab.data.pipeline import open_source

    try:
        return open_source(args.data, root=args.root, download=args.download, options=_options(args.option),
                           paths=True)
    except FileNotFoundError as e:  # the loaders name config keys; this command's flags stand for them here
        text = str(e).replace("set data.download: true", "drop --no-download").replace("data.root", "--root")
        raise FileNotFoundError(text) from None


def _stats(args) -> int:
    from cnnlab.data.stats import compute_stats

    src = _source(args)
    split = getattr(src, args.split)
    if split is None:
        raise InputError(f"{args.data}: has no {args.split} split")
    st = compute_stats(split, channels=args.channels, size=args.size, jobs=args.jobs)
    print(json.dumps(st.to_dict(), indent=1) if args.json else f"{args.data} [{args.split}]\n{st.format()}")
    return 0


def _check(args) -> int:
    from cnnlab.data.check import check, errors, print_findings, summary

    t0 = time.perf_counter()
    src = _source(args)
    findings = check(src, jobs=args.jobs, max_pixels=args.max_pixels)
    if args.json:
        print(json.dumps({"summary": summary(findings), "findings": [f.to_dict() for f in findings]}, indent=1))
    else:
        n = sum(len(s) for s in (src.train, src.val, src.test) if s is not None)
        print(f"{args.data}: {n:,} images checked in {time.perf_counter() - t0:.1f} s")
        print_findings(findings, limit=None if args.all else 10)
    return 1 if errors(findings) else 0


def _build_mnist_m(args) -> int:
    from cnnlab.data.builders import build_mnist_m

    build_mnist_m(args.mnist, args.backgrounds, args.out, seed=args.seed, limit=args.limit)
    return 0


def _coco_subset(args) -> int:
    from cnnlab.data.builders import coco_subset

    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    coco_subset(args.annotations, args.images, classes, args.out, per_class=args.per_class, size=args.size,
                seed=args.seed, jobs=args.jobs)
    return 0


def add_parser(subparsers) -> None:
    """Add `data` with its subcommands to the main CLI's subparsers; each sets `func(args) -> exit code`."""
    d = subparsers.add_parser("data", help="data set statistics, checks and builders")
    sub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    s = sub.add_parser("stats", help="per-channel mean/std, class counts, sizes and modes (one pass)")
    _source_args(s)
    s.add_argument("--channels", type=int, choices=[1, 3], help="convert to 1 or 3 channels (default: the data's)")
    s.add_argument("--size", type=int, help="resize to SIZE x SIZE first, as data.image_size does")
    s.add_argument("--json", action="store_true", help="print the statistics as JSON")
    s.set_defaults(func=_stats)

    c = sub.add_parser("check", help="unreadable/truncated/empty/huge files, modes, classes, labels, duplicates")
    _source_args(c)
    c.add_argument("--max-pixels", type=int, help="flag images over this many pixels (default: Pillow's limit)")
    c.add_argument("--all", action="store_true", help="list every finding, not the first 10 of each kind")
    c.add_argument("--json", action="store_true", help="print the findings as JSON")
    c.set_defaults(func=_check)

    m = sub.add_parser("build-mnist-m", help="blend MNIST digits over colour photo crops (Ganin & Lempitsky 2015)")
    m.add_argument("--mnist", required=True, help="folder with the MNIST IDX files")
    m.add_argument("--backgrounds", required=True, help="folder of colour photos (the paper used BSDS500)")
    m.add_argument("--out", required=True, help="new folder for the data set")
    m.add_argument("--seed", type=int, default=0, help="seed of the crops and backgrounds (default 0)")
    m.add_argument("--limit", type=int, help="only the first N images of each split")
    m.set_defaults(func=_build_mnist_m)

    k = sub.add_parser("coco-subset", help="a class-exclusive, resized COCO subset as a folder data set")
    k.add_argument("--annotations", required=True, help="instances_*.json")
    k.add_argument("--images", required=True, help="folder of the COCO images")
    k.add_argument("--classes", required=True, help="comma-separated category names, e.g. airplane,bus,cat")
    k.add_argument("--per-class", type=int, required=True, help="images of each class")
    k.add_argument("--size", type=int, default=64, help="side of the square crops in pixels (default 64)")
    k.add_argument("--out", required=True, help="new folder for the data set")
    k.add_argument("--seed", type=int, default=0, help="seed of the image choice (default 0)")
    k.add_argument("--jobs", type=int, default=None, help="threads decoding and writing images")
    k.set_defaults(func=_coco_subset)


def main(argv: list[str] | None = None) -> int:
    """`python -m cnnlab.data.cli stats cifar10`: the same as `cnnlab data stats cifar10` (and its exit codes)."""
    from cnnlab import cli

    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main(argv if argv[:1] == ["data"] else ["data", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
