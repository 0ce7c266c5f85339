"""Run folders: create one (auto-numbered, never overwritten), train into it, evaluate the best
checkpoint, and write everything a report or a comparison later reads."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from importlib.metadata import version as _version

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.training import checkpoint as ckpt
from cnnlab import config as C
from cnnlab import dist
from cnnlab import rundir as R
from cnnlab.rundir import MARKER, RunDir, made_by_cnnlab, write_json, write_text  # noqa: F401  (re-exported)
from cnnlab.data.loader import check_augment
from cnnlab.analysis.metrics import worst_failures
from cnnlab.data.pipeline import Splits, prepare, save_splits
from cnnlab.training import calibrate
from cnnlab.training.loss import class_weights
from cnnlab.training.resume import check_same_data, finished, folder_lock, undone_if_untrained


Run = RunDir  # what run() returns: the run folder's typed reader, seeded with the config and metrics


def new_run_dir(cfg: C.Config) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... : an existing folder is never reused (rundir.create, which
    marks it as cnnlab's)."""
    name = cfg.output.name or f"{cfg.data.name}-{cfg.model.name}".replace(":", "-")
    return R.create(cfg.output.dir, name)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: C.Config, device: str) -> dict:
    import cnnlab

    return {"cnnlab": getattr(cnnlab, "__version__", "0"), "python": sys.version.split()[0],
            "torch": torch.__version__, "torchvision": _version("torchvision"), "numpy": np.__version__,
            "platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device,  # results depend on the thread count
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # cnnlab.threads: PASSIVE unless the user chose
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "world_size": dist.world()[2], "seed": cfg.train.seed, "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def data_summary(splits: Splits, cfg: C.Config) -> dict:
    return {"name": cfg.data.name, "root": cfg.data.root, **splits.summary(), "findings": splits.findings}


def save_predictions(run_dir: Path, splits: Splits, logits: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
    """predictions.csv (one row per sample), predictions.npz (logits, targets) and samples.npz (a seeded
    pick of images plus the failures a report shows (`metrics.worst_failures`), raw uint8) so every plot can be redrawn later."""
    import csv

    s = splits.eval_set
    losses = F.cross_entropy(logits, targets, reduction="none")
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    classes = splits.classes
    with open(run_dir / R.PREDICTIONS_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["index", "id", "target", "target_name", "pred", "pred_name", "confidence", "loss"])
        for i in range(len(targets)):
            t, p = int(targets[i]), int(pred[i])
            w.writerow([i, s.ids[i], t, classes[t], p, classes[p], f"{conf[i].item():.6f}", f"{losses[i].item():.6f}"])
    np.savez_compressed(run_dir / R.PREDICTIONS_NPZ, logits=logits.numpy().astype(np.float32),
                        targets=targets.numpy().astype(np.int64))
    if s.images is None and not s.files:
        return
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(targets))[:48]
    worst = worst_failures(targets.numpy(), pred.numpy(), losses.numpy())
    index = np.concatenate([pick, worst[~np.isin(worst, pick)]]).astype(np.int64)  # the seeded pick first
    if s.images is not None:
        imgs = s.images[torch.from_numpy(index)].cpu()
    else:
        from cnnlab.data.base import decode

        imgs = torch.stack([decode(s.files[i], splits.channels, splits.size) for i in index]) if len(index) else \
            torch.zeros(0, splits.channels, splits.size, splits.size, dtype=torch.uint8)
    np.savez_compressed(run_dir / R.SAMPLES, images=imgs.numpy(), index=index)


GALLERY_PER_CLASS, GALLERY_BYTES = 6, 4_000_000  # at most 6 images per class, about 4 MB of pixels in all


def save_gallery(run_dir: Path, splits: Splits, seed: int) -> None:
    """gallery.npz: a seeded pick of a few training images per class, as decoded (no augmentation, no
    normalisation), for the report's data gallery. As many per class as fit the byte budget (1 to 6, a divisor
    of 6 so that the classes line up in the gallery's rows); with many classes of large images, the first ones."""
    s, k = splits.train, len(splits.classes)
    budget = int(np.clip(GALLERY_BYTES // (splits.channels * splits.size ** 2), 10, 160))  # images
    per = next(n for n in (6, 3, 2, 1) if n <= max(1, min(GALLERY_PER_CLASS, budget // max(k, 1))))
    order = np.random.default_rng(seed).permutation(len(s))
    labels = s.labels[order]
    index = np.concatenate([order[labels == c][:per] for c in range(min(k, max(budget // per, 10)))]
                           + [np.zeros(0, np.int64)]).astype(np.int64)
    if s.images is not None:
        imgs = s.images[torch.from_numpy(index)].cpu()
    else:
        from cnnlab.data.base import decode

        imgs = torch.stack([decode(s.files[i], splits.channels, splits.size) for i in index]) if len(index) else \
            torch.zeros(0, splits.channels, splits.size, splits.size, dtype=torch.uint8)
    np.savez_compressed(run_dir / R.GALLERY, images=imgs.numpy(), labels=s.labels[index], index=index)


def run(cfg: C.Config, *, device: torch.device, resume_dir: Path | None = None, quiet: bool = False,
        on_epoch=None) -> Run:
    """Train one configuration into a new run folder (or resume `resume_dir`) and evaluate it.
    `on_epoch`: loop.fit's per-epoch callback (a search trial's pruning).

    `device` comes from `cnnlab.process.setup(cfg)`, called once by the entry point (CLI, `cnnlab.train`).
    """
    from cnnlab.training import loop as T

    check_names(cfg)  # before any work and before the run folder
    say = (lambda *a: None) if quiet or not dist.is_main() else (lambda *a: print(*a, flush=True))
    cfg = with_weight_defaults(cfg)
    with contextlib.ExitStack() as stack:
        if resume_dir is not None and dist.is_main():  # before the data: a second resume is refused at once
            stack.enter_context(folder_lock(Path(resume_dir), "training", T.TrainingError))
        with dist.local_main_first():  # downloads and the decoded cache: written once per node
            splits = prepare(cfg.data, split_seed=cfg.data.split_seed)
        check_augment(cfg.data.augment, splits.size, splits.size, in_memory=splits.train.images is not None)
        class_weights(cfg, splits.train.labels, splits.classes)  # one weight per class: refused before the folder
        dry_build(cfg, splits)  # a bad model.layers value or option: refused before the run folder exists
        found = None
        if cfg.optim.lr == "auto" and resume_dir is None:  # the range test first; the run records its choice
            from cnnlab.training import lrfind

            found = lrfind.range_test(cfg, splits, device)
            if found.suggestion is None:
                raise T.TrainingError(f"optim.lr: auto: the learning-rate range test found no usable rate "
                                      f"({found.stopped}); set optim.lr to a number")
            cfg = lrfind.with_lr(cfg, found.suggestion)
            say(f"optim.lr: auto -> {found.suggestion:g} ({lrfind.describe(found)})")
        # the run folder only once the data is there: a missing or broken data set leaves no empty folder
        if resume_dir is not None:
            run_dir = Path(resume_dir)
            if dist.is_main():
                check_same_data(run_dir, splits, cfg)
            done = finished(run_dir, cfg)  # after the data check: changed data is refused, finished or not
            if done is not None:  # nothing to train: say so rather than silently evaluating again
                say(f"{run_dir} is already finished ({done['epochs_run']} of {cfg.train.epochs} epochs"
                    f"{', stopped early' if done.get('stopped_early') else ''}; {done.get('eval_split', 'test')} "
                    f"accuracy {done['test']['accuracy']:.4f}): nothing to resume. Train longer with `cnnlab train "
                    f"--resume {run_dir} train.epochs=N`, evaluate again with `cnnlab eval {run_dir}`.")
                return RunDir(run_dir, config=cfg, metrics=done)
        else:
            run_dir = new_run_dir(cfg) if dist.is_main() else None
            run_dir = Path(dist.broadcast_object(str(run_dir) if run_dir else None))
            if dist.is_main():
                stack.enter_context(folder_lock(run_dir, "training", T.TrainingError))
        if resume_dir is not None and dist.is_main():  # a resume that fails before training changes nothing
            stack.enter_context(undone_if_untrained(run_dir))
        try:
            return _train_and_evaluate(cfg, run_dir, splits, device=device, resume=resume_dir is not None,
                                       say=say, lr_found=found, on_epoch=on_epoch)
        except BaseException:
            if resume_dir is None and dist.is_main():  # a failed start (device, model, weights, disk) leaves no
                _remove_if_untrained(run_dir)         # empty run folder behind
            raise


def _train_and_evaluate(cfg: C.Config, run_dir: Path, splits: Splits, *, device: torch.device, resume: bool,
                        say, lr_found=None, on_epoch=None) -> Run:
    from cnnlab.training import loop as T

    main = dist.is_main()
    if main:
        (run_dir / R.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        if lr_found is not None:  # optim.lr: auto: the curve and the choice, before config.yaml cites them
            from cnnlab.training import lrfind

            lrfind.write_curve(lr_found, run_dir / R.LR_FIND_CSV)
            write_json(run_dir / R.LR_FIND_JSON, lr_found.summary())
        write_text(run_dir / R.CONFIG, config_text(cfg, run_dir))  # atomic: a kill must not leave a cut config
        env = start_env(run_dir, cfg, str(device))
        write_json(run_dir / R.ENV, env)  # "started" when the run starts; completed at the end
        write_json(run_dir / R.DATA, data_summary(splits, cfg))
        if not (resume and (run_dir / R.SPLITS).is_file()):  # (a resumed run's split was checked: the same)
            save_splits(splits, run_dir / R.SPLITS)
        if not (run_dir / R.GALLERY).is_file():
            save_gallery(run_dir, splits, cfg.train.seed)
        say(f"run folder: {run_dir}")
        say(f"data: {cfg.data.name}, {len(splits.train)} train / {len(splits.val)} val"
            f"{f' / {len(splits.test)} test' if splits.test is not None else ''}, {len(splits.classes)} classes, "
            f"{splits.channels}x{splits.size}x{splits.size}, mean {splits.mean} std {splits.std}")
        for note in splits.notes:
            say(f"note: {note}")
    model, state = T.fit(cfg, run_dir, splits, device=device, resume=resume, on_epoch=on_epoch)
    if main:
        env = {**environment(cfg, str(device)), **{k: env[k] for k in ("started", "resumed") if k in env}}
        env["train_seconds"] = round(state.train_seconds, 3)  # every session of the run, resumes included
        env["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json(run_dir / R.ENV, env)
        _write_model_json(run_dir, model, splits, cfg.model.name)

    # evaluate the best checkpoint on the test split (val where there is none)
    best = ckpt.load(run_dir / R.CHECKPOINTS / R.BEST) if (run_dir / R.CHECKPOINTS / R.BEST).exists() else None
    weights = best["model"] if best else T._unwrap(model).state_dict()
    logits, targets = T.evaluate_weights(cfg, splits, weights, device)
    calibrated = calibrate.fit(cfg, splits, weights, device, logits, targets) if cfg.train.calibrate else None
    metrics = {}
    if main:
        save_predictions(run_dir, splits, logits, targets, cfg.train.seed)
        metrics = headline(cfg, state, splits, logits, targets)
        if calibrated is not None:  # calibration.json, then metrics.json with it
            calibrate.save(run_dir, calibrated, metrics)
            say(f"calibration: {calibrate.describe(calibrated)}")
        else:
            write_json(run_dir / R.METRICS, metrics)
        test = metrics["test"]
        where = "test" if splits.eval_split == "test" else "validation (no test split)"
        say(f"best epoch {state.best_epoch}: val acc {metrics['best_val_acc']:.4f}; "
            f"{where} accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}")
        if cfg.output.report:
            _report(run_dir, say)
    dist.barrier()
    return RunDir(run_dir, config=cfg, metrics=metrics)


def config_text(cfg: C.Config, run_dir: Path) -> str:
    """config.yaml: the resolved config; when `optim.lr: auto` chose the learning rate, its line says so."""
    text = C.dump_yaml(cfg)
    if not (run_dir / R.LR_FIND_JSON).is_file():
        return text
    head, sep, rest = text.partition("\noptim:\n")
    line = f"  lr: {yaml_number(cfg.optim.lr)}\n"
    if sep and line in rest:
        rest = rest.replace(line, line[:-1] + f"  # optim.lr: auto, chosen by the learning-rate range test "
                                              f"({R.LR_FIND_JSON})\n", 1)
    return head + sep + rest


def yaml_number(v: float) -> str:
    import yaml

    return yaml.safe_dump(v).splitlines()[0]


def dry_build(cfg: C.Config, splits: Splits) -> None:
    """Build the model once on the meta device (no memory, no weights loaded) before the run folder exists,
    so that a bad model.layers value or model option is refused before any training work."""
    import dataclasses

    from cnnlab.errors import InputError
    from cnnlab.training import loop as T

    probe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
    try:
        with torch.device("meta"):
            T.build_for(probe, splits)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - an op the meta device lacks: the real build reports real problems
        pass


def start_env(run_dir: Path, cfg: C.Config, device: str) -> dict:
    """env.json as a run (or a resumed session) starts: a resume keeps the first start and lists its own."""
    env = environment(cfg, device)
    try:
        before = json.loads((run_dir / R.ENV).read_text())
    except (OSError, ValueError):
        return env
    if isinstance(before, dict) and before.get("started"):
        env["resumed"] = [*before.get("resumed", []), env["started"]]
        env["started"] = before["started"]
    return env


def _remove_if_untrained(run_dir: Path) -> None:
    """Remove a run folder this process has just made when nothing was trained in it (no checkpoint, no
    logged step): what is left there (config.yaml, data.json, splits.npz) is rewritten by the next run."""
    trained = [p for p in (R.checkpoint_path(run_dir, "last"), R.checkpoint_path(run_dir, "best"),
                           run_dir / R.HISTORY, run_dir / R.STEPS) if p.exists()]
    if not trained and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)


def check_names(cfg: C.Config) -> None:
    """The data set and the model the config names exist: checked where they are built (data/catalog,
    models/build), with "did you mean", naming data.name / model.name (cnnlab.config checks values only)."""
    from cnnlab.data.catalog import check_name as check_data
    from cnnlab.models.build import check_name as check_model
    from cnnlab.training.optim import check as check_optimizer

    check_data(cfg.data.name)
    check_model(cfg.model.name)
    check_optimizer(cfg.optim)


def with_weight_defaults(cfg: C.Config) -> C.Config:
    """Pretrained weights bring their own input size and normalisation, unless the config sets them."""
    if not cfg.model.pretrained:
        return cfg
    import dataclasses

    from cnnlab.models import transfer

    extra = transfer.data_defaults(cfg.model, cfg.data)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **extra)) if extra else cfg


def headline(cfg: C.Config, state, splits: Splits, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """metrics.json: no wall times in it, so the same config and seed give a byte-identical file."""
    from cnnlab.analysis.metrics import summary

    test = summary(logits.numpy(), targets.numpy(), splits.classes)
    hist = state.history
    best_row = next((r for r in hist if r["epoch"] == state.best_epoch), hist[-1] if hist else {})
    return {"best_epoch": state.best_epoch, "monitor": cfg.train.monitor,
            "best_val_acc": best_row.get("val_acc"), "best_val_loss": best_row.get("val_loss"),
            "epochs_run": state.epoch, "stopped_early": state.stopped_early, "steps": state.step,
            **({"stopped_by": state.stopped_by} if state.stopped_by else {}),
            "eval_split": splits.eval_split, "test": test}


def _write_model_json(run_dir: Path, model, splits: Splits, name: str) -> None:
    from cnnlab.training import loop as T

    m = T._unwrap(model)
    info = {"name": name, "class": type(m).__name__, "total_params": sum(p.numel() for p in m.parameters()),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad)}
    try:
        from cnnlab.models.summary import summarize

        s = summarize(m, (splits.channels, splits.size, splits.size))
        info["summary_text"] = s.text()
        info["summary"] = s.to_dict()
    except Exception as e:  # the summary is a nicety; training results must not depend on it
        info["summary_text"] = f"(summary unavailable: {e})"
    write_json(run_dir / R.MODEL, info)


def _report(run_dir: Path, say) -> None:
    try:
        from cnnlab.report import build as report
    except ImportError:
        return
    try:
        path = report.build(run_dir)
    except Exception as e:  # training results are saved; a drawing failure must not lose or hide them
        import traceback

        traceback.print_exc()
        print(f"cnnlab: warning: the report could not be drawn ({type(e).__name__}: {e}); the run is complete. "
              f"Redraw it with: cnnlab report {run_dir}", file=sys.stderr)
        return
    say(f"report: {path}")

