"""`cnnlab summary`: its parser and handler (`add_parser`), and the model built as the trainer would build it.

The handler returns an exit code and raises InputError (naming the option and value) on bad input;
torch and the models are imported inside the functions, so `cnnlab --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from cnnlab.errors import InputError


def parse_shape(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32); '32' -> (3, 32, 32); '1x28' -> (1, 28, 28)."""
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x") if p]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    elif len(parts) == 2:
        parts = [parts[0], parts[1], parts[1]]
    if len(parts) != 3 or min(parts) < 1:
        raise InputError(f"--input={text!r}: expected CxHxW such as 3x32x32 (or a side such as 32)")
    from cnnlab.config import MAX_IMAGE_SIDE

    if max(parts[1:]) > MAX_IMAGE_SIDE or parts[0] > 4096:
        raise InputError(f"--input={text!r}: at most {MAX_IMAGE_SIDE} pixels a side (and 4096 channels), as "
                         "data.image_size")
    return tuple(parts)


def _data_shape(cfg) -> tuple[int | None, int | None, int | None, str | None]:
    """(classes, channels, size) of a config's data set without downloading, or Nones and why not."""
    try:
        from cnnlab.data.pipeline import open_source

        src = open_source(cfg.data.name, root=cfg.data.root, download=False, options=cfg.data.options)
    except FileNotFoundError:  # the loader's advice (data.download, data.root) is for train, not for summary
        return None, None, None, (f"data set {cfg.data.name!r} not found on this machine (summary reads only local "
                                  "files, it never downloads)")
    except Exception as e:  # noqa: BLE001 - any data-set failure just means "use the defaults"
        return None, None, None, f"data set {cfg.data.name!r} not read ({str(e).splitlines()[0] if str(e) else e!r})"
    images = src.train.images
    return (len(src.classes), int(images.shape[1]) if images is not None else None,
            int(images.shape[-1]) if images is not None else None, None)


def build_for_summary(target: str, overrides: list[str], input_text: str | None, classes: int | None,
                      variation: str | None = None):
    """(model, (C, H, W), title, notes) for a model name or a config file (a study's: its base config, or
    `variation`'s), as the trainer would build it."""
    from cnnlab import config as C
    from cnnlab.models import build_model, transfer
    from cnnlab.models._registry import library_of
    from cnnlab.models.build import check_name
    from cnnlab.models.zoo import default_input

    notes = []
    is_file = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    cfg = C.load(target if is_file else {"model": {"name": target}}, overrides)
    if variation is not None:
        from cnnlab.studies.study import variation as pick

        cfg = pick(cfg, variation)[0].cfg
    elif cfg.variations or cfg.grid:
        from cnnlab.studies.study import groups

        notes.append(f"a study: the model of its base config; --variation NAME for one of "
                     f"{', '.join(n for n, _ in groups(cfg))}")
    check_name(cfg.model.name)  # model.name='nett1': ... Did you mean 'net1'?
    c, h, w = default_input(cfg.model.name)
    n_classes = classes
    why = None
    if is_file:
        n, ch, size, why = _data_shape(cfg)
        n_classes = n_classes or n
        c = cfg.data.channels or ch or c
        h = w = cfg.data.image_size or size or h
    spec = transfer.input_spec(cfg.model.pretrained, cfg.model.name)
    if spec.resize and not cfg.data.image_size:
        h = w = spec.resize
        notes.append(f"input {spec.resize} px from the weights {cfg.model.pretrained} "
                     "(set data.image_size to override)")
    if input_text:
        c, h, w = parse_shape(input_text)
    if why:  # one note saying what was used instead (the loader's advice names train's keys: not for summary)
        assumed = ([] if classes else ["10 classes"]) + ([] if input_text else [f"input {c}x{h}x{w}"])
        change = ([] if classes else ["--classes N"]) + ([] if input_text else ["--input CxHxW"])
        notes.append(why + (f"; assumed {' and '.join(assumed)} ({', '.join(change)} to change)" if assumed else ""))
    elif n_classes is None:
        notes.append("assumed 10 classes (a model name gives none); --classes N to change")
    n_classes = n_classes or 10
    mcfg = cfg.model
    if mcfg.pretrained and library_of(mcfg.name)[0] != "timm":  # shapes and counts do not depend on the values
        mcfg = dataclasses.replace(mcfg, pretrained=None)
        notes.append(f"weights {cfg.model.pretrained} not loaded: the summary needs only the shapes")
    model = build_model(mcfg, num_classes=n_classes, in_channels=c, input_size=h)
    title = f"{cfg.model.name} ({n_classes} classes)"
    return model, (c, h, w), title, notes


def _summary(args) -> int:
    from cnnlab.models.summary import summarize

    model, shape, title, notes = build_for_summary(args.target, args.overrides, args.input, args.classes,
                                                   args.variation)
    s = summarize(model, shape, name=title)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(s.text())
    if args.json:
        Path(args.json).write_text(json.dumps(s.to_dict(), indent=1))
    return 0


def add_parser(subparsers) -> None:
    """Add `summary` to the main CLI's subparsers."""
    s = subparsers.add_parser("summary", help="a model's layer table, parameter counts and shape arithmetic")
    s.add_argument("target", help="a model name (net1, resnet18, torchvision:resnet50...) or an experiment YAML")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.padding=1 model.batchnorm=true")
    s.add_argument("--input", help="input shape CxHxW, e.g. 3x32x32 (default: the model's or the data set's)")
    s.add_argument("--classes", type=int, help="number of classes (default: the data set's, else 10)")
    s.add_argument("--variation", metavar="NAME", help="a study config: the model of this variation (default: the "
                   "base config's)")
    s.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    s.set_defaults(func=_summary)
