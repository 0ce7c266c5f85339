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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.training import checkpoint as ckpt
from cnnlab import config as C
from cnnlab import dist
from cnnlab.errors import InputError
from cnnlab.data.loader import check_augment
from cnnlab.data.pipeline import Splits, prepare, save_splits


@dataclass
class Run:
    """A finished (or resumed) run: its folder, config and headline metrics."""

    dir: Path
    config: C.Config
    metrics: dict = field(default_factory=dict)

    @property
    def history(self) -> list[dict]:
        import csv

        with open(self.dir / "history.csv", newline="") as f:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


MARKER = ".cnnlab-run"  # written into every run folder cnnlab makes: only such folders are ever removed


def made_by_cnnlab(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def new_run_dir(cfg: C.Config) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... : an existing folder is never reused."""
    base = Path(cfg.output.dir)
    name = cfg.output.name or f"{cfg.data.name}-{cfg.model.name}".replace(":", "-")
    base.mkdir(parents=True, exist_ok=True)
    for i in range(1, 100_000):
        path = base / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        write_json(path / MARKER, {"kind": "run", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return path
    raise RuntimeError(f"no free run folder name under {base}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: C.Config, device: str) -> dict:
    import torchvision

    import cnnlab

    return {"cnnlab": getattr(cnnlab, "__version__", "0"), "python": sys.version.split()[0],
            "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device,  # results depend on the thread count
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "world_size": dist.world()[2], "seed": cfg.train.seed, "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o)}")


def data_summary(splits: Splits, cfg: C.Config) -> dict:
    return {"name": cfg.data.name, "root": cfg.data.root, **splits.summary(), "findings": splits.findings}


def save_predictions(run_dir: Path, splits: Splits, logits: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
    """predictions.csv (one row per sample), predictions.npz (logits, targets) and samples.npz (a seeded
    pick of images plus the highest-loss failures, raw uint8) so every plot can be redrawn later."""
    import csv

    s = splits.eval_set
    losses = F.cross_entropy(logits, targets, reduction="none")
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    classes = splits.classes
    with open(run_dir / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "id", "target", "target_name", "pred", "pred_name", "confidence", "loss"])
        for i in range(len(targets)):
            t, p = int(targets[i]), int(pred[i])
            w.writerow([i, s.ids[i], t, classes[t], p, classes[p], f"{conf[i].item():.6f}", f"{losses[i].item():.6f}"])
    np.savez_compressed(run_dir / "predictions.npz", logits=logits.numpy().astype(np.float32),
                        targets=targets.numpy().astype(np.int64))
    if s.images is None and not s.files:
        return
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(targets))[:48]
    wrong = torch.nonzero(pred != targets).flatten()
    worst = wrong[losses[wrong].argsort(descending=True)][:64].numpy()
    index = np.concatenate([pick, worst[~np.isin(worst, pick)]]).astype(np.int64)  # the seeded pick first
    if s.images is not None:
        imgs = s.images[torch.from_numpy(index)].cpu()
    else:
        from cnnlab.data.base import decode

        imgs = torch.stack([decode(s.files[i], splits.channels, splits.size) for i in index]) if len(index) else \
            torch.zeros(0, splits.channels, splits.size, splits.size, dtype=torch.uint8)
    np.savez_compressed(run_dir / "samples.npz", images=imgs.numpy(), index=index)


def run(cfg: C.Config, *, device: torch.device, resume_dir: Path | None = None, quiet: bool = False) -> Run:
    """Train one configuration into a new run folder (or resume `resume_dir`) and evaluate it.

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
        check_augment(cfg.data.augment, splits.size, splits.size)
        # the run folder only once the data is there: a missing or broken data set leaves no empty folder
        if resume_dir is not None:
            run_dir = Path(resume_dir)
            if dist.is_main():
                check_same_data(run_dir, splits, cfg)
        else:
            run_dir = new_run_dir(cfg) if dist.is_main() else None
            run_dir = Path(dist.broadcast_object(str(run_dir) if run_dir else None))
            if dist.is_main():
                stack.enter_context(folder_lock(run_dir, "training", T.TrainingError))
        try:
            return _train_and_evaluate(cfg, run_dir, splits, device=device, resume=resume_dir is not None,
                                       say=say)
        except BaseException:
            if resume_dir is None and dist.is_main():  # a failed start (device, model, weights, disk) leaves no
                _remove_if_untrained(run_dir)         # empty run folder behind
            raise


def folder_lock(folder: Path, doing: str, error: type[Exception]):
    """An exclusive flock on <folder>/.lock, held while the context is open: two processes never train
    one run (or run one study); the OS releases it when the process dies in any way."""
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(Path(folder) / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise error(f"another cnnlab process is {doing} {folder}; wait for it to finish (or stop it) "
                            "and run the command again") from None
            yield

    return held()


def _remove_if_untrained(run_dir: Path) -> None:
    """Remove a run folder this process has just made when nothing was trained in it (no checkpoint, no
    logged step): what is left there (config.yaml, data.json, splits.npz) is rewritten by the next run."""
    trained = [p for p in ("checkpoints/last.pt", "checkpoints/best.pt", "history.csv", "steps.csv")
               if (run_dir / p).exists()]
    if not trained and run_dir.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)


def check_same_data(run_dir: Path, splits: Splits, cfg: C.Config) -> None:
    """Resume only on the data the run started with: the same sample ids in each split (splits.npz) and the
    same pixel statistics (data.json); else refuse, saying what changed."""
    changes = []
    if (run_dir / "splits.npz").is_file():
        with np.load(run_dir / "splits.npz") as z:
            saved = {k[:-4]: [str(x) for x in z[k]] for k in z.files if k.endswith("_ids")}
        for name in ("train", "val", "test"):
            s = getattr(splits, name)
            old, new = saved.get(name), [str(x) for x in s.ids] if s is not None else None
            if old == new:
                continue
            if old is None or new is None:
                changes.append(f"{name}: {'no' if new is None else len(new)} images now, "
                               f"{'none' if old is None else len(old)} then")
                continue
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            what = [f"{len(gone)} no longer in it (e.g. {gone[0]})"] * bool(gone) + \
                   [f"{len(added)} new (e.g. {added[0]})"] * bool(added) or ["the same images in another order"]
            changes.append(f"{name}: {len(old)} -> {len(new)} images, {', '.join(what)}")
    try:
        old_data = json.loads((run_dir / "data.json").read_text())
    except (OSError, ValueError):
        old_data = None
    if isinstance(old_data, dict) and not changes:
        for key, now in (("classes", list(splits.classes)), ("mean", list(splits.mean)), ("std", list(splits.std))):
            if key in old_data and old_data[key] != now:
                changes.append(f"{key}: {old_data[key]} then, {now} now (the pixels changed)" if key != "classes"
                               else f"classes: {old_data[key]} then, {now} now")
    if changes:
        raise DataChangedError(
            f"--resume {run_dir}: the data ({cfg.data.name}, data.root={cfg.data.root!r}) is not what this run "
            f"started with: {'; '.join(changes)}. Resuming would train and validate on a different split. Restore "
            "the data, or train a new run on it.")


SAFE_ON_RESUME = ("train.epochs", "train.progress", "train.threads", "data.num_workers", "output.report",
                  "output.tensorboard")  # overrides that leave what has been trained valid


def resume_config(run_dir: str | Path, overrides: list[str] | None) -> C.Config:
    """The config to resume a run with: its config.yaml plus the overrides that are safe mid-run (more
    epochs, progress, threads, workers, report, TensorBoard); any other override is refused by name."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise C.ConfigError(f"--resume {str(run_dir)!r}: not a run folder (no config.yaml in it)")
    saved = C.load(run_dir / "config.yaml")
    if not overrides:
        return saved
    cfg = C.load(saved, overrides)
    before, after = _flat(C.to_dict(saved)), _flat(C.to_dict(cfg))
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    unsafe = [k for k in changed if k not in SAFE_ON_RESUME]
    if unsafe:
        raise C.ConfigError(
            f"--resume {run_dir}: {', '.join(f'{k}={after.get(k)!r}' for k in unsafe)} cannot change on resume: the "
            f"epochs already trained used {', '.join(f'{k}={before.get(k)!r}' for k in unsafe)}. Overrides allowed on "
            f"resume: {', '.join(SAFE_ON_RESUME)}. To train with the new setting, start a new run from "
            f"{run_dir / 'config.yaml'}.")
    if "train.epochs" in changed:
        old, new = saved.train.epochs, cfg.train.epochs
        if new < old:
            raise C.ConfigError(f"--resume {run_dir}: train.epochs={new}: on resume the number of epochs can only "
                                f"grow (this run was set to {old})")
        fixed = [w for w, on in (("schedule.name=onecycle", cfg.schedule.name == "onecycle"),
                                 ("train.lookahead", cfg.train.lookahead)) if on]
        if fixed:
            raise C.ConfigError(f"--resume {run_dir}: train.epochs={new}: {' and '.join(fixed)} are laid out over "
                                f"the {old} epochs the run started with; more epochs cannot be added on resume")
    return cfg


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class DataChangedError(InputError, ValueError):
    """The data set under a run changed since it started; resuming is refused (the CLI exits 2)."""


def _train_and_evaluate(cfg: C.Config, run_dir: Path, splits: Splits, *, device: torch.device, resume: bool,
                        say) -> Run:
    from cnnlab.training import loop as T

    main = dist.is_main()
    t_start = time.perf_counter()
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", C.dump_yaml(cfg))  # atomic: a kill must not leave a cut config
        write_json(run_dir / "data.json", data_summary(splits, cfg))
        if not (resume and (run_dir / "splits.npz").is_file()):  # (a resumed run's split was checked: the same)
            save_splits(splits, run_dir / "splits.npz")
        say(f"run folder: {run_dir}")
        say(f"data: {cfg.data.name}, {len(splits.train)} train / {len(splits.val)} val"
            f"{f' / {len(splits.test)} test' if splits.test is not None else ''}, {len(splits.classes)} classes, "
            f"{splits.channels}x{splits.size}x{splits.size}, mean {splits.mean} std {splits.std}")
        for note in splits.notes:
            say(f"note: {note}")
    model, state = T.fit(cfg, run_dir, splits, device=device, resume=resume)
    if main:
        env = environment(cfg, str(device))
        env["train_seconds"] = round(time.perf_counter() - t_start, 3)
        write_json(run_dir / "env.json", env)
        _write_model_json(run_dir, model, splits)

    # evaluate the best checkpoint on the test split (val where there is none)
    best = ckpt.load(run_dir / "checkpoints" / "best.pt") if (run_dir / "checkpoints" / "best.pt").exists() else None
    logits, targets = T.evaluate_weights(cfg, splits, best["model"] if best else T._unwrap(model).state_dict(), device)
    metrics = {}
    if main:
        save_predictions(run_dir, splits, logits, targets, cfg.train.seed)
        metrics = headline(cfg, state, splits, logits, targets)
        write_json(run_dir / "metrics.json", metrics)
        test = metrics["test"]
        where = "test" if splits.eval_split == "test" else "validation (no test split)"
        say(f"best epoch {state.best_epoch}: val acc {metrics['best_val_acc']:.4f}; "
            f"{where} accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f}")
        if cfg.output.report:
            _report(run_dir, say)
    dist.barrier()
    return Run(dir=run_dir, config=cfg, metrics=metrics)


def check_names(cfg: C.Config) -> None:
    """The data set and the model the config names exist: checked where they are built (data/catalog,
    models/build), with "did you mean", naming data.name / model.name (config.py checks values only)."""
    from cnnlab.data.catalog import check_name as check_data
    from cnnlab.models.build import check_name as check_model

    check_data(cfg.data.name)
    check_model(cfg.model.name)


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
    try:
        from cnnlab.analysis.metrics import summary
        test = summary(logits.numpy(), targets.numpy(), splits.classes)
    except ImportError:  # pragma: no cover - metrics module absent
        from sklearn.metrics import confusion_matrix

        test = {"accuracy": float((logits.argmax(1) == targets).float().mean()),
                "loss": float(F.cross_entropy(logits, targets)),
                "confusion_matrix": confusion_matrix(targets, logits.argmax(1), labels=range(len(splits.classes))).tolist()}
    hist = state.history
    best_row = next((r for r in hist if r["epoch"] == state.best_epoch), hist[-1] if hist else {})
    return {"best_epoch": state.best_epoch, "monitor": cfg.train.monitor,
            "best_val_acc": best_row.get("val_acc"), "best_val_loss": best_row.get("val_loss"),
            "epochs_run": state.epoch, "stopped_early": state.stopped_early, "steps": state.step,
            "eval_split": splits.eval_split, "test": test}


def _write_model_json(run_dir: Path, model, splits: Splits) -> None:
    from cnnlab.training import loop as T

    m = T._unwrap(model)
    info = {"name": cfg_name(run_dir), "class": type(m).__name__, "total_params": sum(p.numel() for p in m.parameters()),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad)}
    try:
        from cnnlab.models.summary import summarize

        s = summarize(m, (splits.channels, splits.size, splits.size))
        info["summary_text"] = s.text()
        info["summary"] = s.to_dict()
    except Exception as e:  # the summary is a nicety; training results must not depend on it
        info["summary_text"] = f"(summary unavailable: {e})"
    write_json(run_dir / "model.json", info)


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


def cfg_name(run_dir: Path) -> str:
    return C.load(run_dir / "config.yaml").model.name
