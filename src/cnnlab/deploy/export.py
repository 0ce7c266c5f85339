"""`cnnlab export RUN_DIR --format onnx|torchscript`: the run's model as a deployable file, verified.

The file takes float (N, C, S, S) input, the pixels / 255 minus `mean`, divided by `std`, and returns
logits (N, K). What a deployer needs (class names, input size, mean/std, cnnlab version, run id) goes
into the file (ONNX metadata_props; TorchScript extra file `cnnlab.json`) and into a sidecar
`<file>.json`. After writing, the exported model runs (onnxruntime / torch.jit.load) on real images of
the run beside eager PyTorch: the largest logit difference and the top-1 agreement are printed, and
the export fails (nothing left behind) when they disagree. ONNX needs the `export` extra.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from cnnlab import rundir as R
from cnnlab.deploy.classifier import RunFacts, build_model, read_run
from cnnlab.errors import RunError

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-3  # largest logit difference accepted (float32 kernels differ by ~1e-6 to 1e-5)


class ExportError(RunError, RuntimeError):
    """The export failed or does not reproduce the model (the CLI prints it, exit 1)."""


def metadata(run: RunFacts, fmt: str, *, dynamic_batch: bool, opset: int | None) -> dict:
    import cnnlab

    return {"format": fmt, "classes": run.classes, "num_classes": len(run.classes),
            "input_shape": [run.channels, run.size, run.size], "input_size": run.size, "channels": run.channels,
            "mean": list(run.mean), "std": list(run.std),
            "preprocessing": "RGB (or grey) pixels / 255, minus mean, divided by std, per channel; (N, C, H, W)",
            "output": "logits (N, K); softmax(logits / temperature) gives the class probabilities",
            "temperature": run.temperature,  # 1.0 unless the run was calibrated (`cnnlab calibrate`)
            "dynamic_batch": dynamic_batch, "opset": opset, "model": run.config.model.name,
            "cnnlab_version": cnnlab.__version__, "run_id": run.dir.resolve().name,
            "run_dir": str(run.dir.resolve()), "run_started": run.env.get("started"),
            "git_commit": run.env.get("git_commit"), "checkpoint": run.checkpoint, "epoch": run.epoch}


def to_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, *, dynamic_batch: bool,
            opset: int | None, meta: dict) -> dict:
    """torch.onnx's exporter (torch.export based), the metadata added with onnx."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ExportError(f"ONNX export needs the export extra ({e.name} is missing): "
                          "pip install -e '.[export]'  (onnx, onnxscript, onnxruntime)") from None
    shapes = ({0: torch.export.Dim.DYNAMIC},) if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                     opset_version=opset, dynamic_shapes=shapes, external_data=False)
        except Exception as e:  # noqa: BLE001 - torch.export's errors are long; keep the first line
            raise ExportError(f"torch.onnx.export could not export {meta['model']}: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from None
    proto = prog.model_proto
    meta = {**meta, "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    proto.producer_name = "cnnlab"
    onnx.save(proto, str(path))
    return meta


def to_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, *, meta: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still supported
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(path), _extra_files={"cnnlab.json": json.dumps(meta)})
    return meta


def load_exported(path: Path, fmt: str):
    """The exported file, loaded once, as a function float (N, C, S, S) -> logits (N, K)."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; still supported
        m = torch.jit.load(str(path))

    def run(x):
        with torch.no_grad():
            return m(x).float()

    return run


def run_exported(path: Path, fmt: str, x: torch.Tensor, *, dynamic_batch: bool) -> torch.Tensor:
    """The exported file's logits for float input x (N, C, S, S), one image at a time when its batch is fixed."""
    fn = load_exported(path, fmt)
    return torch.cat([fn(c) for c in ([x] if dynamic_batch else x.split(1))])


def samples(run: RunFacts, n: int = 64) -> tuple[torch.Tensor, str]:
    """Up to n real images of the run (samples.npz, the evaluated split's images) as uint8 (N, C, S, S)."""
    f = run.dir / R.SAMPLES
    if f.is_file():
        imgs = torch.from_numpy(np.load(f)["images"][:n])
        if len(imgs) and tuple(imgs.shape[1:]) == (run.channels, run.size, run.size):
            return imgs, f"{len(imgs)} images of the run (samples.npz)"
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, run.channels, run.size, run.size), generator=g, dtype=torch.uint8),
            f"{n} random images (the run has no samples.npz)")


def compare(eager: torch.Tensor, exported: torch.Tensor) -> tuple[float, int]:
    """(largest absolute logit difference, how many top-1 classes agree)."""
    diff = float((eager - exported).abs().max()) if eager.numel() else 0.0
    return diff, int((eager.argmax(1) == exported.argmax(1)).sum())


def export(run_dir, format: str = "onnx", out=None, *, dynamic_batch: bool = False, opset: int | None = None,
           checkpoint: str = "best", say=print) -> Path:
    """Export a run's model to ONNX or TorchScript, verify it against eager PyTorch, return its path."""
    from cnnlab.data.loader import Normalizer

    fmt = format.lower()
    if fmt not in SUFFIX:
        raise ValueError(f"--format {format!r}: use onnx or torchscript")
    run = read_run(run_dir, checkpoint)
    out = Path(out) if out else run.dir / f"model{SUFFIX[fmt]}"
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    model = build_model(run)  # CPU, float32, NCHW, eval
    meta = metadata(run, fmt, dynamic_batch=dynamic_batch or fmt == "torchscript", opset=opset)
    pixels, what = samples(run)
    x = Normalizer(run.mean, run.std, "cpu")(pixels)
    example = x[:2] if dynamic_batch and len(x) >= 2 else x[:1]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "onnx":
            meta = to_onnx(model, example, tmp, dynamic_batch=dynamic_batch, opset=opset, meta=meta)
        else:
            meta = to_torchscript(model, example, tmp, meta=meta)
        with torch.no_grad():
            eager = model(x).float()
        got = run_exported(tmp, fmt, x, dynamic_batch=meta["dynamic_batch"])
        diff, agree = compare(eager, got)
        say(f"verified on {what}: max |logit difference| {diff:.2e}, top-1 agrees on {agree}/{len(x)}")
        if agree < len(x) or not diff <= TOLERANCE:
            raise ExportError(f"the exported {fmt} model disagrees with PyTorch on {what}: max |logit difference| "
                              f"{diff:.2e} (tolerance {TOLERANCE:g}), top-1 agrees on {agree}/{len(x)}; "
                              f"nothing written to {out}")
        side = out.with_name(out.name + ".json")
        side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        side_tmp.write_text(json.dumps({**meta, "verified": {"samples": len(x), "max_abs_logit_diff": diff,
                                                               "top1_agree": agree}}, indent=1) + "\n")
        os.replace(tmp, out)
        os.replace(side_tmp, side)
    finally:
        tmp.unlink(missing_ok=True)
    say(f"exported {fmt}: {out} (metadata also in {out.name}.json)")
    return out
