"""A model's summary: layer table (torchinfo for mult-adds), totals and memory, and the shape arithmetic
in words — each conv/pool step's floor((W - K + 2P) / S) + 1, each layer's parameter formula, the
receptive field — with warnings when a feature map vanishes or a pooling drops a row/column."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _hw(h: int, w: int) -> str:
    return str(h) if h == w else f"{h}x{w}"


class Geometry(NamedTuple):
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]
    ceil: bool


def geometry(m: nn.Module, in_hw: tuple[int, int]) -> Geometry:
    """Kernel, stride, padding, dilation of a conv or pooling layer (adaptive pools: the equivalent ones)."""
    if isinstance(m, ADAPTIVE):
        out = [o if o is not None else i for o, i in zip(_pair(m.output_size) if m.output_size is not None else in_hw,
                                                          in_hw)]
        s = tuple(max(i // o, 1) for i, o in zip(in_hw, out))
        k = tuple(i - (o - 1) * st for i, o, st in zip(in_hw, out, s))
        return Geometry(k, s, (0, 0), (1, 1), False)
    k = _pair(m.kernel_size)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    pad = m.padding
    if isinstance(pad, str):  # 'same' / 'valid' convs (stride 1)
        pad = tuple((dd * (kk - 1)) // 2 for dd, kk in zip(_pair(m.dilation), k)) if pad == "same" else (0, 0)
    d = _pair(getattr(m, "dilation", 1))
    return Geometry(k, s, _pair(pad), d, bool(getattr(m, "ceil_mode", False)))


def out_size(w: int, k: int, p: int, s: int, d: int = 1, ceil: bool = False) -> int:
    """floor((W - K_eff + 2P) / S) + 1 with K_eff = D*(K-1) + 1 (PyTorch's Conv2d/MaxPool2d rule)."""
    keff = d * (k - 1) + 1
    out = (math.ceil if ceil else math.floor)((w - keff + 2 * p) / s) + 1
    if ceil and (out - 1) * s >= w + p:  # PyTorch: the last window must start inside the input or left padding
        out -= 1
    return out


def formula(w: int, k: int, p: int, s: int, d: int = 1, ceil: bool = False) -> str:
    keff = d * (k - 1) + 1
    kk = f"{keff}" if d == 1 else f"({d}*({k}-1)+1)"
    return f"{'ceil' if ceil else 'floor'}(({w} - {kk} + 2*{p}) / {s}) + 1 = {out_size(w, k, p, s, d, ceil)}"


def label(m: nn.Module, g: Geometry) -> str:
    k = _hw(*g.k)
    if isinstance(m, ADAPTIVE):
        kind = "avgpool" if isinstance(m, nn.AdaptiveAvgPool2d) else "maxpool"
        return f"adaptive {kind} -> {_hw(*_pair(m.output_size))}"
    if isinstance(m, nn.Conv2d):
        text = f"conv k{k}"
        if g.s != (1, 1):
            text += f" s{_hw(*g.s)}"
    else:
        text = f"{'maxpool' if isinstance(m, nn.MaxPool2d) else 'avgpool'} {k}"
        if g.s != g.k:
            text += f" s{_hw(*g.s)}"
    if g.p != (0, 0):
        text += f" p{_hw(*g.p)}"
    if g.d != (1, 1):
        text += f" d{_hw(*g.d)}"
    return text + (" ceil" if g.ceil else "")


def param_formula(m: nn.Module) -> str | None:
    """'(K*K*Cin + 1)*Cout = n' for a conv, '(in + 1)*out = n' for a linear, '2*C = n' for a batchnorm."""
    n = sum(p.numel() for p in m.parameters(recurse=False))
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        cin = f"{m.in_channels}/{m.groups}" if m.groups > 1 else f"{m.in_channels}"
        inner = f"{kh}*{kw}*{cin}" + (" + 1" if m.bias is not None else "")
        return f"conv {m.in_channels}->{m.out_channels} k{_hw(kh, kw)}: ({inner})*{m.out_channels} = {n:,}"
    if isinstance(m, nn.Linear):
        inner = f"{m.in_features}" + (" + 1" if m.bias is not None else "")
        return f"linear {m.in_features}->{m.out_features}: ({inner})*{m.out_features} = {n:,}"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return f"batchnorm {m.num_features}: 2*{m.num_features} = {n:,} (scale and shift; running stats are buffers)"
    return None


@dataclass
class _State:
    """Where a feature-map tensor stands: size, receptive field and jump (input pixels per step), per axis."""

    c: int
    hw: tuple[int, int]
    rf: tuple[int, int]
    jump: tuple[int, int]


@dataclass
class Summary:
    model: str
    input_shape: tuple[int, int, int]
    rows: list[dict]
    total_params: int
    trainable_params: int
    param_bytes: int
    buffer_bytes: int
    activation_bytes: int  # every layer's output for one image, forward pass
    mult_adds: int | None  # per image (torchinfo)
    chain: list[str]
    param_lines: list[str]
    warnings: list[str] = field(default_factory=list)

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def to_dict(self) -> dict:
        return {"model": self.model, "input_shape": list(self.input_shape), "total_params": self.total_params,
                "trainable_params": self.trainable_params, "frozen_params": self.frozen_params,
                "param_bytes": self.param_bytes, "buffer_bytes": self.buffer_bytes,
                "activation_bytes": self.activation_bytes, "mult_adds": self.mult_adds, "layers": self.rows,
                "chain": self.chain, "param_lines": self.param_lines, "warnings": self.warnings}

    def text(self) -> str:
        head = ["Layer (type)", "Output", "Params", "Kernel", "Mult-adds", "RF"]
        body = [[f"{r['name']} ({r['type']})", r["output"], f"{r['params']:,}" if r["params"] else "-",
                 r["kernel"] or "", f"{r['mult_adds']:,}" if r["mult_adds"] else "", r["rf"] or ""]
                for r in self.rows]
        width = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, width))).rstrip()
        rule = "-" * len(fmt(head))
        c, h, w = self.input_shape
        out = [f"{self.model} on {c}x{h}x{w}", rule, fmt(head), rule, *map(fmt, body), rule,
               f"total parameters:     {self.total_params:,}",
               f"trainable parameters: {self.trainable_params:,}",
               f"frozen parameters:    {self.frozen_params:,}",
               f"parameter memory:     {_mb(self.param_bytes)} (+ {_mb(self.buffer_bytes)} buffers)",
               f"activations:          {_mb(self.activation_bytes)} per image, forward pass "
               "(training keeps about this much per image for the backward pass)"]
        if self.mult_adds is not None:
            out.append(f"mult-adds:            {self.mult_adds:,} per image")
        out += ["", "Shape arithmetic, out = floor((W - K + 2P) / S) + 1:", *[f"  {x}" for x in self.chain]]
        out += ["", "Parameters, (K*K*Cin + 1)*Cout per conv and (in + 1)*out per linear:",
                *[f"  {x}" for x in self.param_lines]]
        if self.warnings:
            out += ["", "Warnings:", *[f"  ! {x}" for x in self.warnings]]
        return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _torchinfo_macs(model: nn.Module, x: torch.Tensor) -> tuple[dict[int, int], int] | None:
    """Mult-adds per module id and in total, from torchinfo (None when it cannot trace the model)."""
    try:
        from torchinfo import summary as ti_summary

        stats = ti_summary(model, input_data=x, verbose=0, mode="eval", device=x.device)
    except Exception:  # noqa: BLE001 - torchinfo raises its own wrapped errors
        return None
    macs: dict[int, int] = {}
    for info in stats.summary_list:
        if info.is_leaf_layer or not any(True for _ in info.module.children()):
            macs[info.layer_id] = macs.get(info.layer_id, 0) + int(info.macs)
    return macs, int(stats.total_mult_adds)


def summarize(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32), *, name: str | None = None) -> Summary:
    """Run one image of `input_shape` (C, H, W) through `model` with hooks and describe every layer.

    Never raises for shapes: a forward pass that fails (a map shrunk below the kernel) ends the table
    there and becomes a warning with the failing layer's arithmetic.
    """
    c, h, w = (int(v) for v in input_shape)
    param = next(model.parameters(), None)
    x = torch.zeros(1, c, h, w, device=param.device if param is not None else "cpu",
                    dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32)
    names = {id(m): n or "(model)" for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not any(True for _ in m.children())
              or any(True for _ in m.parameters(recurse=False))]
    leafset = {m for m in model.modules() if not any(True for _ in m.children())}
    states: dict[int, _State] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so that their ids stay unique
    history: list[_State] = []
    calls: list[dict] = []
    chain: list[tuple[str, tuple[int, int], bool]] = []  # (label, out size, from an adaptive pool)
    steps: list[str] = []
    warns: list[str] = []
    sizes = [(h, w)]
    flat: list[str] = []
    current: list = [None]

    def state_of(t: torch.Tensor) -> _State | None:
        if id(t) in states:
            return states[id(t)]
        if t.ndim != 4:
            return None
        same = [s for s in history if s.hw == tuple(t.shape[-2:])]  # an add or multiply of tracked maps
        return max(same, key=lambda s: s.rf) if same else (history[-1] if history else None)

    def pre(m, inputs):
        current[0] = (m, inputs)

    def post(m, inputs, output):
        xin = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        out = output if isinstance(output, torch.Tensor) else None
        st = state_of(xin) if xin is not None else None
        new, rf_text, kernel = None, "", ""
        if isinstance(m, SPATIAL) and xin is not None and xin.ndim == 4 and st is not None and out is not None:
            hw = tuple(xin.shape[-2:])
            g = geometry(m, hw)
            kernel = "" if isinstance(m, ADAPTIVE) else f"{g.k[0]}x{g.k[1]}"
            keff = [dd * (kk - 1) + 1 for dd, kk in zip(g.d, g.k)]
            new = _State(out.shape[1], tuple(out.shape[-2:]),
                         tuple(r + (ke - 1) * j for r, ke, j in zip(st.rf, keff, st.jump)),
                         tuple(j * s for j, s in zip(st.jump, g.s)))
            lab, who = label(m, g), names[id(m)]
            rewind = [i for i, (_, size, _) in enumerate(chain) if size == hw]
            on_chain = sizes[-1] == hw
            if not on_chain and rewind and rewind[-1] + 1 < len(chain) and chain[rewind[-1] + 1][2]:
                del chain[rewind[-1] + 1:]  # back from a squeeze-and-excitation style global-pool detour
                del sizes[rewind[-1] + 2:]
                on_chain = True
            if on_chain:
                chain.append((lab, new.hw, isinstance(m, ADAPTIVE)))
                sizes.append(new.hw)
            fs = [formula(i, k, p, s, d, g.ceil) for i, k, p, s, d in zip(hw, g.k, g.p, g.s, g.d)]
            text = fs[0] if hw[0] == hw[1] and g.k[0] == g.k[1] and g.s[0] == g.s[1] and g.p[0] == g.p[1] \
                else f"H: {fs[0]}; W: {fs[1]}"
            steps.append(f"{who} ({lab}): {text}; receptive field {_hw(*new.rf)}"
                         + ("" if on_chain else " [side branch]"))
            if not isinstance(m, ADAPTIVE) and (not isinstance(m, nn.Conv2d) or min(keff) >= max(g.s)):
                drop = [(p + i) - ((o - 1) * s + ke) for i, ke, p, s, o in zip(hw, keff, g.p, g.s, new.hw)]
                if max(drop) > 0:
                    what = " and ".join(f"{n} {x}{'s' if n > 1 else ''}"
                                        for n, x in zip(drop, ("row", "column")) if n > 0)
                    axis = 0 if drop[0] > 0 else 1
                    warns.append(f"{who} ({lab}) on {_hw(*hw)}: {fs[axis]} leaves the last {what} of the map unused "
                                 f"({hw[axis]} - {keff[axis]} + 2*{g.p[axis]} is not a multiple of {g.s[axis]}); "
                                 "an even size (or padding) would use it")
        elif out is not None and out.ndim == 4 and st is not None:
            ratio = [max(a // max(b, 1), 1) for a, b in zip(st.hw, out.shape[-2:])]
            new = _State(out.shape[1], tuple(out.shape[-2:]), st.rf, tuple(j * r for j, r in zip(st.jump, ratio)))
        if out is not None and out.ndim == 2 and xin is not None and not flat and chain:
            if isinstance(m, nn.Flatten) and xin.ndim == 4:
                ci, hi, wi = xin.shape[1:]
                flat.append(f"flatten = {ci}*{hi}*{wi} = {ci * hi * wi}")
            elif isinstance(m, nn.Linear) and xin.ndim == 2:
                last = history[-1] if history else None
                if last is not None and last.c * last.hw[0] * last.hw[1] == xin.shape[1]:
                    flat.append(f"flatten = {last.c}*{last.hw[0]}*{last.hw[1]} = {xin.shape[1]}")
                else:
                    flat.append(f"features -> {xin.shape[1]}")
        if new is not None and out is not None:
            states[id(out)] = new
            history.append(new)
            keep.append(out)
        if new is not None:
            rf_text = _hw(*new.rf)
        elif out is not None and out.ndim == 4 and st is not None:
            rf_text = _hw(*st.rf)
        if out is None and isinstance(output, (tuple, list)):
            out = next((t for t in output if isinstance(t, torch.Tensor)), None)
        calls.append({"module": m, "output": "x".join(map(str, out.shape[1:])) if out is not None else "?",
                      "bytes": out.numel() * out.element_size() if out is not None and m in leafset else 0,
                      "rf": rf_text,
                      "kernel": kernel or _kernel_of(m)})

    states[id(x)] = _State(c, (h, w), (1, 1), (1, 1))
    history.append(states[id(x)])
    modes = {m: m.training for m in model.modules()}
    hooks = [hh for m in leaves for hh in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    failed = False
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        failed = True
        warns.append(_failure(current[0], names, e))
    finally:
        for hh in hooks:
            hh.remove()
        for m, t in modes.items():
            m.training = t
    ti = None if failed else _torchinfo_macs(model, x)
    for m, t in modes.items():  # torchinfo resets every submodule to the root's mode
        m.training = t

    rows, seen, counted = [], set(), set()
    for call in calls:
        m = call["module"]
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        rows.append({"name": names[id(m)], "type": type(m).__name__, "output": call["output"],
                     "params": sum(p.numel() for p in own), "kernel": call["kernel"],
                     "mult_adds": ti[0].get(id(m)) if ti and id(m) not in counted else None, "rf": call["rf"]})
        counted.add(id(m))
    for n, m in model.named_modules():  # parameters of layers the forward pass never reached
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        if own:
            seen.update(id(p) for p in own)
            rows.append({"name": n or "(model)", "type": type(m).__name__, "output": "not run",
                         "params": sum(p.numel() for p in own), "kernel": _kernel_of(m), "mult_adds": None, "rf": ""})
    params = list(model.parameters())
    chain_line = (" -> ".join([_hw(h, w)] + _compress(chain, (h, w))) if chain
                  else f"{_hw(h, w)} (no conv or pooling layer)")
    chain_lines = [chain_line + (f"; {flat[0]}" if flat else ""), *steps]
    seen_p: set[int] = set()
    param_lines = []
    for n, m in model.named_modules():
        if id(m) not in seen_p and (text := param_formula(m)):
            seen_p.add(id(m))
            param_lines.append(f"{n}: {text}")
    return Summary(
        model=name or type(model).__name__, input_shape=(c, h, w), rows=rows,
        total_params=sum(p.numel() for p in params), trainable_params=sum(p.numel() for p in params if p.requires_grad),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        activation_bytes=sum(cl["bytes"] for cl in calls), mult_adds=ti[1] if ti else None,
        chain=chain_lines, param_lines=param_lines, warnings=warns)


def _kernel_of(m: nn.Module) -> str:
    k = getattr(m, "kernel_size", None)
    return "x".join(map(str, _pair(k))) if k is not None and not isinstance(m, ADAPTIVE) else ""


def _compress(chain: list[tuple[str, tuple[int, int], bool]], start: tuple[int, int], limit: int = 24) -> list[str]:
    """'16 (conv k3 p1) x10' for runs of identical steps; past `limit` steps only the size changes."""
    out: list[tuple[str, int]] = []
    for lab, hw, _ in chain:
        text = f"{_hw(*hw)} ({lab})"
        if out and out[-1][0] == text:
            out[-1] = (text, out[-1][1] + 1)
        else:
            out.append((text, 1))
    if len(out) <= limit:
        return [t + (f" x{n}" if n > 1 else "") for t, n in out]
    short, size, same = [], start, 0
    for lab, hw, _ in chain:
        if hw == size:
            same += 1
            continue
        if same and short:
            short[-1] += f" +{same} same-size layer{'s' if same > 1 else ''}"
        short.append(f"{_hw(*hw)} ({lab})")
        size, same = hw, 0
    if same and short:
        short[-1] += f" +{same} same-size layer{'s' if same > 1 else ''}"
    return short


def _failure(current, names: dict, err: Exception) -> str:
    """A warning for a forward pass that failed, with the failing layer's arithmetic when it is a conv/pool."""
    if current is None:
        return f"the forward pass failed before any layer ran: {err}"
    m, inputs = current
    xin = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    where = f"{names.get(id(m), '?')} ({type(m).__name__})"
    if isinstance(m, SPATIAL) and not isinstance(m, ADAPTIVE) and xin is not None and xin.ndim == 4:
        hw = tuple(xin.shape[-2:])
        g = geometry(m, hw)
        outs = [out_size(i, k, p, s, d, g.ceil) for i, k, p, s, d in zip(hw, g.k, g.p, g.s, g.d)]
        if min(outs) < 1:
            fs = formula(hw[0], g.k[0], g.p[0], g.s[0], g.d[0], g.ceil)
            return (f"{where} ({label(m, g)}) on {_hw(*hw)}: {fs} < 1 — the feature map has shrunk below 1x1. "
                    "Use a larger input, padding, or fewer pooling/strided layers.")
    shape = tuple(xin.shape) if xin is not None else "?"
    return f"{where} cannot take an input of shape {shape}: {str(err).splitlines()[0]}"
