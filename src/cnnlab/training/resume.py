"""Resuming a run safely: one process per run folder (`folder_lock`, shared with studies), the data checked
against the split the run recorded (`check_same_data`), and the overrides that may change mid-run
(`resume_config`: more epochs yes, another learning rate no), and whether there is anything left to
resume (`finished`)."""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.errors import InputError

if TYPE_CHECKING:
    from cnnlab.data.pipeline import Splits


folder_lock = R.lock  # the run folder's lock (rundir owns the lock file)


def check_same_data(run_dir: Path, splits: Splits, cfg: C.Config) -> None:
    """Resume only on the data the run started with: the same sample ids in each split (splits.npz) and the
    same pixel statistics (data.json); else refuse, saying what changed."""
    changes = []
    if (run_dir / R.SPLITS).is_file():
        with np.load(run_dir / R.SPLITS) as z:
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
        old_data = R.read_json(run_dir / R.DATA)
    except ValueError:  # damaged: nothing to compare against
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
                  "output.tensorboard", "train.calibrate")  # overrides that leave what has been trained valid


def resume_config(run_dir: str | Path, overrides: list[str] | None) -> C.Config:
    """The config to resume a run with: its config.yaml plus the overrides that are safe mid-run (more
    epochs, progress, threads, workers, report, TensorBoard); any other override is refused by name."""
    run_dir = Path(run_dir)
    if not (run_dir / R.CONFIG).is_file():
        raise C.ConfigError(f"--resume {str(run_dir)!r}: not a run folder (no {R.CONFIG} in it)")
    saved = R.RunDir(run_dir).config
    if not overrides:
        return saved
    cfg = C.load(saved, overrides)
    before, after = C.flatten(C.to_dict(saved)), C.flatten(C.to_dict(cfg))
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    unsafe = [k for k in changed if k not in SAFE_ON_RESUME]
    if unsafe:
        raise C.ConfigError(
            f"--resume {run_dir}: {', '.join(f'{k}={after.get(k)!r}' for k in unsafe)} cannot change on resume: the "
            f"epochs already trained used {', '.join(f'{k}={before.get(k)!r}' for k in unsafe)}. Overrides allowed on "
            f"resume: {', '.join(SAFE_ON_RESUME)}. To train with the new setting, start a new run from "
            f"{run_dir / R.CONFIG}.")
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


class DataChangedError(InputError, ValueError):
    """The data set under a run changed since it started; resuming is refused (the CLI exits 2)."""


def finished(run_dir: Path, cfg: C.Config) -> dict | None:
    """metrics.json of a run whose training ended (all `train.epochs`, or stopped early) and was
    evaluated; None when there is something left to do."""
    from cnnlab.training import checkpoint as ckpt

    try:
        metrics = R.read_json(run_dir / R.METRICS)
        state = ckpt.load(R.checkpoint_path(run_dir, "last"))["state"]
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if not isinstance(metrics, dict) or "test" not in metrics or not isinstance(state, dict):
        return None  # a damaged last.pt is refused, naming it, when the resume loads it
    return metrics if state.get("stopped_early") or state.get("epoch", 0) >= cfg.train.epochs else None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def undone_if_untrained(run_dir: Path):
    """A resume that fails before it has trained (a damaged or refused checkpoint, a full disk at the start)
    puts back what it rewrote as it started: config.yaml (which would otherwise record overrides such as
    train.epochs for epochs never trained), env.json (which would list a resume that did not happen) and
    data.json. "Untrained" means last.pt is the file it was."""
    keep = {name: (run_dir / name).read_bytes() for name in (R.CONFIG, R.ENV, R.DATA) if (run_dir / name).is_file()}
    last = R.checkpoint_path(run_dir, "last")
    stamp = _stamp(last)
    try:
        yield
    except BaseException:
        if _stamp(last) == stamp:
            for name, data in keep.items():
                path = run_dir / name
                if not path.is_file() or path.read_bytes() != data:
                    R.write_bytes(path, data)
        raise
