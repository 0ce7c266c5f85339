"""`cnnlab summary` and `cnnlab explain` subcommands; `register(subparsers)` adds them to the main CLI.

Handlers return an exit code and raise ValueError subclasses (naming the option and value) on bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


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
        raise ValueError(f"--input={text!r}: expected CxHxW such as 3x32x32 (or a side such as 32)")
    return tuple(parts)


def _data_shape(cfg) -> tuple[int | None, int | None, int | None, str | None]:
    """(classes, channels, size) of a config's data set without downloading, or Nones and why not."""
    try:
        from cnnlab.data.pipeline import open_source

        src = open_source(cfg.data.name, root=cfg.data.root, download=False, options=cfg.data.options)
    except Exception as e:  # noqa: BLE001 - any data-set failure just means "use the defaults"
        return None, None, None, f"data set {cfg.data.name!r} not read ({str(e).splitlines()[0] if str(e) else e!r})"
    images = src.train.images
    return (len(src.classes), int(images.shape[1]) if images is not None else None,
            int(images.shape[-1]) if images is not None else None, None)


def build_for_summary(target: str, overrides: list[str], input_text: str | None, classes: int | None):
    """(model, (C, H, W), title, notes) for a model name or a config file, as the trainer would build it."""
    from cnnlab import config as C
    from cnnlab.models import build_model, transfer
    from cnnlab.models.zoo import default_input

    notes = []
    is_file = target.endswith((".yaml", ".yml")) or Path(target).is_file()
    cfg = C.load(target if is_file else {"model": {"name": target}}, overrides)
    c, h, w = default_input(cfg.model.name)
    n_classes = classes
    if is_file:
        n, ch, size, why = _data_shape(cfg)
        if why:
            notes.append(why + "; using the model's default input and 10 classes unless --input/--classes "
                         "say otherwise")
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
    n_classes = n_classes or 10
    mcfg = cfg.model
    if mcfg.pretrained and not mcfg.name.startswith("timm:"):  # shapes and counts do not depend on the values
        mcfg = dataclasses.replace(mcfg, pretrained=None)
        notes.append(f"weights {cfg.model.pretrained} not loaded: the summary needs only the shapes")
    model = build_model(mcfg, num_classes=n_classes, in_channels=c, input_size=h)
    title = f"{cfg.model.name} ({n_classes} classes)"
    return model, (c, h, w), title, notes


def _summary(args) -> int:
    from cnnlab.models.summary import summarize

    model, shape, title, notes = build_for_summary(args.target, args.overrides, args.input, args.classes)
    s = summarize(model, shape, name=title)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    print(s.text())
    if args.json:
        Path(args.json).write_text(json.dumps(s.to_dict(), indent=1))
    return 0


def _explain_conv(args) -> int:
    from cnnlab.models import explain as E

    name, kernel = E.kernel_from(args.kernel)
    x = E.parse_matrix(args.input, "--input")
    print(E.conv2d(x, kernel, padding=_int_pair(args.padding, "--padding"), stride=_int_pair(args.stride, "--stride"),
                   flip=args.flip, kernel_name=name).text())
    return 0


def _int_pair(text: str, what: str):
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected a whole number (or two, rows,columns)") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"{what}={text!r}: expected one or two whole numbers")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _explain_size(args) -> int:
    from cnnlab.models import explain as E

    sol = E.solve_output_size(input=args.input, kernel=args.kernel, padding=args.padding, stride=args.stride,
                              output=args.output, dilation=args.dilation)
    print(sol.text())
    return 0 if sol.values else 1


def _ints(text: str, what: str, n: tuple[int, ...]) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        vals = []
    if len(vals) not in n or min(vals, default=0) < 1:
        raise ValueError(f"{what}={text!r}: expected {' or '.join(map(str, n))} positive whole numbers, "
                         "comma-separated")
    return vals


def _explain_params(args) -> int:
    from cnnlab.models import explain as E

    lines, total = [], 0
    for text in args.conv or []:
        v = _ints(text, "--conv", (3, 4))
        n, line = E.conv_params(v[0], v[1], v[2], bias=not args.no_bias, groups=v[3] if len(v) == 4 else 1)
        lines.append(line)
        total += n
    for text in args.linear or []:
        v = _ints(text, "--linear", (2,))
        n, line = E.linear_params(v[0], v[1], bias=not args.no_bias)
        lines.append(line)
        total += n
    for text in args.bn or []:
        n, line = E.batchnorm_params(_ints(text, "--bn", (1,))[0])
        lines.append(line)
        total += n
    if not lines:
        raise ValueError("cnnlab explain params: give at least one --conv CIN,COUT,K, --linear IN,OUT or --bn C")
    print("\n".join(lines))
    if len(lines) > 1:
        print(f"total: {total:,}")
    return 0


def register(subparsers) -> None:
    """Add `summary` and `explain` to the main CLI's subparsers."""
    s = subparsers.add_parser("summary", help="a model's layer table, parameter counts and shape arithmetic")
    s.add_argument("target", help="a model name (net1, resnet18, torchvision:resnet50...) or an experiment YAML")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.padding=1 model.batchnorm=true")
    s.add_argument("--input", help="input shape CxHxW, e.g. 3x32x32 (default: the model's or the data set's)")
    s.add_argument("--classes", type=int, help="number of classes (default: the data set's, else 10)")
    s.add_argument("--json", metavar="PATH", help="also write the summary as JSON")
    s.set_defaults(func=_summary)

    e = subparsers.add_parser("explain", help="convolution arithmetic worked by hand")
    sub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = sub.add_parser("conv", help="every output cell of a 2-D convolution as a sum of products")
    c.add_argument("--input", required=True, help="a matrix, e.g. \"[[2,1,0],[0,3,1],[4,0,2]]\"")
    c.add_argument("--kernel", default="sobel-x",
                   help="sobel-x, sobel-y, laplacian, box, identity, sharpen, or a matrix (default sobel-x)")
    c.add_argument("--padding", default="0", help="zero padding (or rows,columns); default 0")
    c.add_argument("--stride", default="1", help="stride (or rows,columns); default 1")
    c.add_argument("--flip", action="store_true", help="flip the kernel: convolution in the textbook sense")
    c.set_defaults(func=_explain_conv)

    o = sub.add_parser("output-size", help="solve floor((W - K + 2P) / S) + 1 = out for the one value left out")
    for key in ("input", "kernel", "padding", "stride", "output"):
        o.add_argument(f"--{key}", type=int)
    o.add_argument("--dilation", type=int, default=1)
    o.set_defaults(func=_explain_size)

    p = sub.add_parser("params", help="parameter counts with their formulas")
    p.add_argument("--conv", action="append", metavar="CIN,COUT,K[,GROUPS]", help="a conv layer (repeatable)")
    p.add_argument("--linear", action="append", metavar="IN,OUT", help="a linear layer (repeatable)")
    p.add_argument("--bn", action="append", metavar="C", help="a batchnorm layer (repeatable)")
    p.add_argument("--no-bias", action="store_true", help="layers without bias")
    p.set_defaults(func=_explain_params)


def main(argv: list[str] | None = None) -> int:
    """Run these subcommands alone (tests; `python -m cnnlab.models.cli summary net1`)."""
    parser = argparse.ArgumentParser(prog="cnnlab")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
