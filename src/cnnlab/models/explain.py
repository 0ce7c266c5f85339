"""The arithmetic of a convolution, worked by hand: every output cell's sum of products, the output-size
formula solved for any one unknown, and parameter counts with their formulas (`cnnlab explain ...`)."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

from cnnlab.errors import InputError

KERNELS: dict[str, list[list[float]]] = {
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],  # responds to left-right changes (vertical edges)
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],  # responds to top-bottom changes (horizontal edges)
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "box": [[1 / 9] * 3 for _ in range(3)],  # 3x3 mean
    "identity": [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
}


class ExplainError(InputError, ValueError):
    """Input to `cnnlab explain` that cannot be worked out; the message names the option and value."""


def num(v: float) -> str:
    """2 for 2.0, 0.1111 for 1/9: numbers as a person would write them."""
    v = float(v)
    if v.is_integer():
        return str(int(v))
    return f"{v:.4g}"


def _factor(v: float) -> str:
    return f"({num(v)})" if v < 0 else num(v)


def matrix_text(rows: list[list[float]], indent: str = "  ") -> str:
    cells = [[num(v) for v in r] for r in rows]
    width = max((len(c) for r in cells for c in r), default=1)
    return "\n".join(indent + " ".join(c.rjust(width) for c in r) for r in cells)


def parse_matrix(text: str, what: str = "--input") -> list[list[float]]:
    """'[[2,1,0],[0,3,1]]' (or one row '[1,2,3]', or '1 2; 3 4') -> a rectangular list of float rows."""
    try:
        value = ast.literal_eval(text.strip()) if text.strip().startswith("[") else \
            [[float(x) for x in row.replace(",", " ").split()] for row in text.split(";")]
    except (ValueError, SyntaxError):
        raise ExplainError(f"{what}={text!r}: not a matrix; write it as [[2,1,0],[0,3,1]] or '2 1 0; 0 3 1'") from None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        value = [value]
    is_row = lambda r: isinstance(r, (list, tuple)) and r and all(isinstance(v, (int, float)) for v in r)  # noqa: E731
    if not isinstance(value, (list, tuple)) or not value or not all(is_row(r) for r in value):
        raise ExplainError(f"{what}={text!r}: expected a list of rows of numbers, e.g. [[2,1,0],[0,3,1]]")
    if len({len(r) for r in value}) != 1:
        raise ExplainError(f"{what}={text!r}: rows have different lengths {[len(r) for r in value]}")
    return [[float(v) for v in r] for r in value]


def kernel_from(text: str) -> tuple[str, list[list[float]]]:
    """A named kernel (sobel-x, sobel-y, laplacian, box, identity, sharpen) or a literal matrix."""
    key = text.strip().lower().replace("_", "-")
    if key in KERNELS:
        return key, KERNELS[key]
    if not key.startswith("[") and not any(ch.isdigit() for ch in key):
        import difflib

        close = difflib.get_close_matches(key, list(KERNELS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ExplainError(f"--kernel={text!r}: unknown kernel.{hint} Named: {', '.join(KERNELS)}; or a matrix")
    return "given", parse_matrix(text, "--kernel")


def _pair(v, what: str) -> tuple[int, int]:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    return int(a), int(b)


@dataclass
class ConvExplanation:
    input: list[list[float]]
    kernel: list[list[float]]  # as applied (flipped already when `flip`)
    padded: list[list[float]]
    output: list[list[float]]
    cells: list[str]  # "out[0,0] = 0*(-1) + ... = 3"
    padding: tuple[int, int]
    stride: tuple[int, int]
    flip: bool = False
    kernel_name: str = "given"
    size_lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        (ph, pw), (sh, sw) = self.padding, self.stride
        what = ("convolution in the textbook sense: the kernel is flipped 180 degrees, then slid"
                if self.flip else "cross-correlation, as PyTorch's conv2d computes it (the kernel is not flipped)")
        pad = f"padding {ph}" if ph == pw else f"padding {ph} rows, {pw} columns"
        out = [f"{what}; out[i,j] = sum over u,v of padded[i*S + u, j*S + v] * kernel[u,v]",
               f"input {len(self.input)}x{len(self.input[0])}:", matrix_text(self.input)]
        if (ph, pw) != (0, 0):
            out += [f"zero-padded ({pad}) -> {len(self.padded)}x{len(self.padded[0])}:", matrix_text(self.padded)]
        name = f" {self.kernel_name}" if self.kernel_name != "given" else ""
        out += [f"kernel{name}{' flipped' if self.flip else ''} {len(self.kernel)}x{len(self.kernel[0])}:",
                matrix_text(self.kernel), "output size: " + "; ".join(self.size_lines), "", *self.cells, "",
                f"output {len(self.output)}x{len(self.output[0])} (stride {sh}{'' if sh == sw else f'x{sw}'}):",
                matrix_text(self.output)]
        return "\n".join(out)


def conv2d(x: list[list[float]], kernel: list[list[float]], padding=0, stride=1, *, flip: bool = False,
           kernel_name: str = "given") -> ConvExplanation:
    """One-channel 2-D convolution worked cell by cell (zero padding; cross-correlation unless `flip`)."""
    (ph, pw), (sh, sw) = _pair(padding, "padding"), _pair(stride, "stride")
    if ph < 0 or pw < 0:
        raise ExplainError(f"--padding={padding!r}: must be >= 0")
    if sh < 1 or sw < 1:
        raise ExplainError(f"--stride={stride!r}: must be >= 1")
    k = [list(reversed(r)) for r in reversed(kernel)] if flip else [list(r) for r in kernel]
    h, w, kh, kw = len(x), len(x[0]), len(k), len(k[0])
    padded = [[0.0] * (w + 2 * pw) for _ in range(ph)] + [[0.0] * pw + list(r) + [0.0] * pw for r in x] \
        + [[0.0] * (w + 2 * pw) for _ in range(ph)]
    oh, ow = (h - kh + 2 * ph) // sh + 1, (w - kw + 2 * pw) // sw + 1
    sizes = [f"floor(({h} - {kh} + 2*{ph}) / {sh}) + 1 = {oh}"]
    if (h, kh, ph, sh) != (w, kw, pw, sw):
        sizes = [f"rows {sizes[0]}", f"columns floor(({w} - {kw} + 2*{pw}) / {sw}) + 1 = {ow}"]
    if oh < 1 or ow < 1:
        raise ExplainError(f"--kernel {kh}x{kw} does not fit the {h}x{w} input padded by {ph}x{pw}: "
                           f"{'; '.join(sizes)} < 1; use a smaller kernel or more padding")
    output, cells = [], []
    for i in range(oh):
        row = []
        for j in range(ow):
            terms = [(padded[i * sh + u][j * sw + v], k[u][v]) for u in range(kh) for v in range(kw)]
            value = math.fsum(a * b for a, b in terms)
            row.append(value)
            cells.append(f"out[{i},{j}] = " + " + ".join(f"{_factor(a)}*{_factor(b)}" for a, b in terms)
                         + f" = {num(value)}")
        output.append(row)
    return ConvExplanation(input=x, kernel=k, padded=padded, output=output, cells=cells, padding=(ph, pw),
                           stride=(sh, sw), flip=flip, kernel_name=kernel_name, size_lines=sizes)


# ---- out = floor((in - K_eff + 2P) / S) + 1, solved for any one unknown

NAMES = ("input", "kernel", "padding", "stride", "output")


@dataclass
class SizeSolution:
    unknown: str | None  # None: everything was given and checked
    values: list[int]  # every integer solution in range (empty: none)
    lines: list[str]
    open_ended: bool = False  # stride when the output is 1: any stride from values[0] up

    def text(self) -> str:
        return "\n".join(self.lines)


def output_size(i: int, k: int, p: int, s: int, d: int = 1) -> int:
    return (i - (d * (k - 1) + 1) + 2 * p) // s + 1


def solve_output_size(*, input: int | None = None, kernel: int | None = None, padding: int | None = None,
                      stride: int | None = None, output: int | None = None, dilation: int = 1) -> SizeSolution:
    """Solve floor((input - K + 2*padding) / stride) + 1 = output (K = dilation*(kernel-1)+1) for the one
    value left out. When two are missing, stride 1 and then padding 0 are assumed (and said)."""
    vals = dict(input=input, kernel=kernel, padding=padding, stride=stride, output=output)
    lines = ["out = floor((in - K + 2P) / S) + 1" + (f", K = {dilation}*(kernel - 1) + 1" if dilation != 1 else "")]
    for key, default in (("stride", 1), ("padding", 0)):
        if sum(v is None for v in vals.values()) > 1 and vals[key] is None:
            vals[key] = default
            lines.append(f"assuming {key} {default} (give --{key} to set it)")
    missing = [k for k, v in vals.items() if v is None]
    if len(missing) > 1:
        raise ExplainError(f"give all but one of --input, --kernel, --padding, --stride, --output; "
                           f"missing: {', '.join('--' + m for m in missing)}")
    for key, v in vals.items():
        low = 0 if key == "padding" else 1
        if v is not None and v < low:
            raise ExplainError(f"--{key}={v}: must be >= {low}")
    i, k, p, s, o = (vals[n] for n in NAMES)
    d = dilation
    keff = None if k is None else d * (k - 1) + 1
    if not missing:
        got = output_size(i, k, p, s, d)
        ok = "matches" if got == o else f"does not match the given output {o}"
        lines.append(f"floor(({i} - {keff} + 2*{p}) / {s}) + 1 = {got}: {ok}")
        return SizeSolution(None, [got] if got == o else [], lines)
    unknown = missing[0]
    if unknown == "output":
        got = output_size(i, k, p, s, d)
        lines.append(f"output = floor(({i} - {keff} + 2*{p}) / {s}) + 1 = {got}")
        if got < 1:
            lines.append(f"no output: the kernel ({keff}) is larger than the padded input ({i + 2 * p})")
            return SizeSolution(unknown, [], lines)
        unused = p + i - ((got - 1) * s + keff)  # real rows past the last window
        if unused > 0:
            lines.append(f"{i} - {keff} + 2*{p} = {i - keff + 2 * p} is not a multiple of {s}: the last {unused} "
                         f"input row(s)/column(s) are never covered by the kernel")
        return SizeSolution(unknown, [got], lines)
    if unknown == "stride":
        span = i - keff + 2 * p  # (out - 1) * S <= span < out * S
        if span < 0:
            lines.append(f"no stride works: the kernel ({keff}) is larger than the padded input ({i + 2 * p})")
            return SizeSolution(unknown, [], lines)
        if o == 1:
            lines.append(f"output 1: any stride >= {span + 1} (in - K + 2P = {span} must be < S)")
            return SizeSolution(unknown, [span + 1], lines, open_ended=True)
        found = [st for st in range(1, span + 2) if span // st + 1 == o]
        lines.append(f"need floor({span} / S) + 1 = {o}, i.e. {span}/{o} < S <= {span}/{o - 1}")
        lines.append(f"stride = {', '.join(map(str, found))}" if found else
                     f"no integer stride gives {o} (stride {max(1, span // (o - 1))} gives "
                     f"{span // max(1, span // (o - 1)) + 1})")
        return SizeSolution(unknown, found, lines)
    # input, kernel and padding enter linearly: (o - 1)*s <= in - K + 2P <= (o - 1)*s + s - 1
    lo, hi = (o - 1) * s, (o - 1) * s + s - 1
    expr = {"input": f"in - {keff} + 2*{p}", "kernel": f"{i} - K + 2*{p}", "padding": f"{i} - {keff} + 2P"}[unknown]
    lines.append(f"need {lo} <= {expr} <= {hi}" + (f" (stride {s}: {s} values give the same output)" if s > 1 else ""))
    if unknown == "input":
        found = [n for n in range(max(1, lo + keff - 2 * p), hi + keff - 2 * p + 1)]
        lines.append(f"input = {', '.join(map(str, found))}" if found else "no input size works")
    elif unknown == "kernel":
        found = [kk for kk in range(1, i + 2 * p + 1) if lo <= i - (d * (kk - 1) + 1) + 2 * p <= hi]
        lines.append(f"kernel = {', '.join(map(str, found))}" if found else
                     f"no integer kernel: K would have to be between {i + 2 * p - hi} and {i + 2 * p - lo}"
                     + (f" with K = {d}*(kernel - 1) + 1" if d != 1 else ""))
    else:
        need_lo, need_hi = lo + keff - i, hi + keff - i  # range of 2P
        found = [pp for pp in range(max(0, math.ceil(need_lo / 2)), need_hi // 2 + 1)]
        if found:
            lines.append(f"2P between {need_lo} and {need_hi}: padding = {', '.join(map(str, found))}")
        elif need_hi < 0:
            lines.append(f"no padding works: even padding 0 gives {output_size(i, k, 0, s, d)} (> {o}); "
                         "a larger kernel or stride shrinks the map further")
        else:
            lines.append(f"no integer padding: 2P would have to be {need_lo} (P = {need_lo / 2:g}); symmetric "
                         f"padding adds rows in pairs. Pad {need_lo // 2} on one side and {need_lo - need_lo // 2} "
                         "on the other (what padding='same' does), or change the kernel to an odd size")
    return SizeSolution(unknown, found, lines)


# ---- parameter counts


def conv_params(cin: int, cout: int, k, *, bias: bool = True, groups: int = 1) -> tuple[int, str]:
    """(K*K*Cin/groups + 1)*Cout with its worked formula."""
    kh, kw = _pair(k, "kernel")
    if cin % groups or cout % groups:
        raise ExplainError(f"--conv {cin},{cout},{k}: groups={groups} must divide both channel counts")
    n = (kh * kw * cin // groups + int(bias)) * cout
    cin_t = f"{cin}/{groups}" if groups > 1 else f"{cin}"
    return n, f"conv {cin}->{cout} k{kh if kh == kw else f'{kh}x{kw}'}: (K*K*Cin{'/groups' if groups > 1 else ''}" \
              f"{' + 1' if bias else ''})*Cout = ({kh}*{kw}*{cin_t}{' + 1' if bias else ''})*{cout} = {n:,}"


def linear_params(fin: int, fout: int, *, bias: bool = True) -> tuple[int, str]:
    """(in + 1)*out with its worked formula."""
    n = (fin + int(bias)) * fout
    return n, f"linear {fin}->{fout}: (in{' + 1' if bias else ''})*out = ({fin}{' + 1' if bias else ''})*{fout} = {n:,}"


def batchnorm_params(c: int) -> tuple[int, str]:
    return 2 * c, f"batchnorm {c}: 2*C = 2*{c} = {2 * c:,} (scale and shift; running mean/var are buffers)"


# ----------------------------------------------------------------------------------------------
# CLI: `cnnlab explain conv | output-size | params`


def _explain_conv(args) -> int:
    name, kernel = kernel_from(args.kernel)
    x = parse_matrix(args.input, "--input")
    stride = _int_pair(args.stride, "--stride")
    print(conv2d(x, kernel, padding=_padding(args.padding, kernel, stride), stride=stride,
                 flip=args.flip, kernel_name=name).text())
    return 0


def _padding(text: str, kernel, stride):
    """--padding as a number, rows,columns, or PyTorch's words: valid (0) and same (output as large as the input)."""
    word = str(text).strip().lower()
    if word == "valid":
        return 0
    if word != "same":
        return _int_pair(text, "--padding")
    if stride not in (1, (1, 1)):
        raise ExplainError(f"--padding same needs --stride 1 (as PyTorch's padding='same'), not {stride}")
    kh, kw = len(kernel), len(kernel[0])
    if kh % 2 == 0 or kw % 2 == 0:
        raise ExplainError(f"--padding same with a {kh}x{kw} kernel needs uneven padding ({(kh - 1) // 2} before, "
                           f"{kh // 2} after); this worked example pads evenly: give a number instead")
    return ((kh - 1) // 2, (kw - 1) // 2)


def _int_pair(text: str, what: str):
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ExplainError(f"{what}={text!r}: expected a whole number (or two, rows,columns)") from None
    if len(parts) not in (1, 2):
        raise ExplainError(f"{what}={text!r}: expected one or two whole numbers")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _explain_size(args) -> int:
    sol = solve_output_size(input=args.input, kernel=args.kernel, padding=args.padding, stride=args.stride,
                            output=args.output, dilation=args.dilation)
    print(sol.text())
    return 0 if sol.values else 1


def _ints(text: str, what: str, n: tuple[int, ...]) -> list[int]:
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        vals = []
    if len(vals) not in n or min(vals, default=0) < 1:
        raise ExplainError(f"{what}={text!r}: expected {' or '.join(map(str, n))} positive whole numbers, "
                           "comma-separated")
    return vals


def _explain_params(args) -> int:
    lines, total = [], 0
    for text in args.conv or []:
        v = _ints(text, "--conv", (3, 4))
        n, line = conv_params(v[0], v[1], v[2], bias=not args.no_bias, groups=v[3] if len(v) == 4 else 1)
        lines.append(line)
        total += n
    for text in args.linear or []:
        v = _ints(text, "--linear", (2,))
        n, line = linear_params(v[0], v[1], bias=not args.no_bias)
        lines.append(line)
        total += n
    for text in args.bn or []:
        n, line = batchnorm_params(_ints(text, "--bn", (1,))[0])
        lines.append(line)
        total += n
    if not lines:
        raise ExplainError("cnnlab explain params: give at least one --conv CIN,COUT,K, --linear IN,OUT or --bn C")
    print("\n".join(lines))
    if len(lines) > 1:
        print(f"total: {total:,}")
    return 0


def add_parser(subparsers) -> None:
    """Add `explain` with its subcommands to the main CLI's subparsers."""
    e = subparsers.add_parser("explain", help="convolution arithmetic worked by hand")
    sub = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = sub.add_parser("conv", help="every output cell of a 2-D convolution as a sum of products")
    c.add_argument("--input", required=True, help="a matrix, e.g. \"[[2,1,0],[0,3,1],[4,0,2]]\"")
    c.add_argument("--kernel", default="sobel-x",
                   help="sobel-x, sobel-y, laplacian, box, identity, sharpen, or a matrix (default sobel-x)")
    c.add_argument("--padding", default="0",
                   help="zero padding (or rows,columns), or same / valid as in PyTorch; default 0")
    c.add_argument("--stride", default="1", help="stride (or rows,columns); default 1")
    c.add_argument("--flip", action="store_true", help="flip the kernel: convolution in the textbook sense")
    c.set_defaults(func=_explain_conv)

    o = sub.add_parser("output-size", help="solve floor((W - K + 2P) / S) + 1 = out for the one value left out")
    for key, what in (("input", "input width W"), ("kernel", "kernel size K"), ("padding", "zero padding P per side"),
                      ("stride", "stride S"), ("output", "output width out")):
        o.add_argument(f"--{key}", type=int, help=f"the {what} (leave out the one to solve for)")
    o.add_argument("--dilation", type=int, default=1, help="kernel dilation (default 1)")
    o.set_defaults(func=_explain_size)

    p = sub.add_parser("params", help="parameter counts with their formulas")
    p.add_argument("--conv", action="append", metavar="CIN,COUT,K[,GROUPS]", help="a conv layer (repeatable)")
    p.add_argument("--linear", action="append", metavar="IN,OUT", help="a linear layer (repeatable)")
    p.add_argument("--bn", action="append", metavar="C", help="a batchnorm layer (repeatable)")
    p.add_argument("--no-bias", action="store_true", help="layers without bias")
    p.set_defaults(func=_explain_params)
