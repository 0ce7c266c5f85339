"""The run folder: the one owner of its layout. The file names (constants below), creating a run folder
(auto-numbered, never reused, marked as cnnlab's own), the atomic writers, and one typed reader `RunDir`
that report, compare, studies, eval and the Python API use to read a run back.

Every other module asks this one for a path (`RunDir(d).path_of(rundir.HISTORY)` or `d / rundir.HISTORY`);
no other module spells a run-folder file name. Imports nothing from cnnlab at module level (torch, numpy and
the config are loaded by the readers that need them), so anything may import it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from functools import cached_property
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# The layout. A run folder:
MARKER = ".cnnlab-run"          # written first, at creation: {"kind": "run" | "study", "created": ...}
CONFIG = "config.yaml"          # the resolved config (atomic)
ENV = "env.json"                # versions, machine, seed, wall time
DATA = "data.json"              # data facts: classes, sizes, counts, mean/std, data-check findings
SPLITS = "splits.npz"           # the split's sample ids
MODEL = "model.json"            # model name, parameter counts, layer summary
HISTORY = "history.csv"         # one row per epoch
STEPS = "steps.csv"             # one row per logged step
GRADS = "grads.csv"             # per-layer gradient norms at the logging interval
METRICS = "metrics.json"        # headline metrics; its presence means "finished"
CALIBRATION = "calibration.json"  # the temperature fitted on the validation split (train.calibrate, `cnnlab calibrate`)
PREDICTIONS_CSV = "predictions.csv"  # one row per evaluated sample
PREDICTIONS_NPZ = "predictions.npz"  # logits, targets
SAMPLES = "samples.npz"         # a seeded pick of images plus the worst failures (uint8)
GALLERY = "gallery.npz"         # a few training images per class as decoded (uint8), for the data gallery
CHECKPOINTS = "checkpoints"     # folder: BEST, LAST
BEST = "best.pt"
LAST = "last.pt"
FINDINGS = "findings.json"      # the report's diagnostics
FAILURES = "failures.csv"       # every misclassified sample, highest loss first
PLOTS = "plots"                 # folder of PNGs
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
TENSORBOARD = "tensorboard"     # folder
EVALS = "evals"                 # folder: evals/<n>/ (METRICS, PREDICTIONS_*, SAMPLES) from `cnnlab eval`
LR_FIND_CSV = "lr_find.csv"     # the learning-rate range test's curve (step, lr, loss, smoothed)
LR_FIND_JSON = "lr_find.json"   # its suggestion, when `optim.lr: auto` chose the run's learning rate
LR_FIND_PNG = "lr_find.png"     # `cnnlab lr-find`'s plot (in a run folder: plots/lr_find.png)
# A study folder (runs in sub-folders) and a comparison's output folder:
STUDY_YAML = "study.yaml"
STUDY_JSON = "study.json"       # the study's manifest
LOCK = ".lock"                  # flock'ed while a process trains the run (or runs the study)
STUDY_CONFIGS = "configs"
STUDY_LOGS = "logs"
SEARCH_JOURNAL = "search.journal"  # a search's Optuna storage (journal file), unless search.storage names one
SEARCH_JSON = "search.json"     # every trial: state, objective, parameters, per-epoch values; the importances
SEARCH_CSV = "search.csv"       # the trials table, best first
SEARCH_HTML = "search.html"
SEARCH_MD = "search.md"
BEST_YAML = "best.yaml"         # a ready config with the best trial's settings
SEARCH_REPEATS = "repeats"      # folder: with `repeats`, a study of the best settings and the baseline over seeds
COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "study.html"
COMPARISON_MD = "study.md"

HISTORY_CLIPPED = "clipped"     # history.csv's column: the share of the epoch's optimizer steps that clipped (train.clip_grad)
HISTORY_TMP = tuple(f".{n}.tmp" for n in (HISTORY, STEPS, GRADS))  # what a kill while rewriting the logs leaves
INT_COLS = {"epoch", "step", "index", "target", "pred"}
TEXT_COLS = {"id", "target_name", "pred_name"}
PREDICTION_COLS = ["index", "id", "target", "target_name", "pred", "pred_name", "confidence", "loss"]


# ----------------------------------------------------------------------------------------------
# Creating and recognising run folders


def create(parent: str | Path, name: str, *, kind: str = "run") -> Path:
    """parent/<name>, or <name>-2, -3, ...: an existing folder is never reused. The marker goes in first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 100_000):
        path = parent / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        mark(path, kind)
        return path
    raise RuntimeError(f"no free run folder name under {parent}")


def mark(path: str | Path, kind: str = "run") -> None:
    """Write the marker that says cnnlab made this folder (kind: run | study); an existing one is kept."""
    p = Path(path) / MARKER
    if not p.exists():
        write_json(p, {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def marker(path: str | Path) -> dict | None:
    """The marker's contents, or None when the folder has none (not made by cnnlab, or made before markers)."""
    p = Path(path) / MARKER
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"kind": "unknown"} if p.is_file() else None
    return m if isinstance(m, dict) else {"kind": "unknown"}


def made_by_cnnlab(path: str | Path) -> bool:
    """True only when the folder carries cnnlab's marker (strict: safe to decide on deleting it)."""
    return marker(path) is not None


def is_run_dir(path: str | Path) -> bool:
    """A run folder: marked as a run by cnnlab, or (a folder written before markers existed) holding
    CONFIG together with DATA or METRICS. Use `made_by_cnnlab` where only the marker may count."""
    p = Path(path)
    m = marker(p)
    if m is not None:
        return m.get("kind") == "run"
    return (p / CONFIG).is_file() and ((p / DATA).is_file() or (p / METRICS).is_file())


def is_study_dir(path: str | Path) -> bool:
    p = Path(path)
    m = marker(p)
    return (m or {}).get("kind") == "study" or (p / STUDY_JSON).is_file()


def lock(folder: str | Path, doing: str, error: type[Exception]):
    """An exclusive flock on <folder>/.lock, held while the context is open: two processes never train one
    run (or run one study); the OS releases it when the process dies in any way. `error(message)` is raised
    when another process holds it."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(Path(folder) / LOCK, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise error(f"another cnnlab process is {doing} {folder}; wait for it to finish (or stop it) "
                            "and run the command again") from None
            yield

    return held()


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """checkpoints/best.pt or checkpoints/last.pt of a run folder."""
    if which not in ("best", "last"):
        raise ValueError(f"checkpoint {which!r}: expected best or last")
    return Path(run_dir) / CHECKPOINTS / (BEST if which == "best" else LAST)


def next_eval_dir(run_dir: str | Path) -> Path:
    """evals/<n>/ with n one past the highest so far, created."""
    out = Path(run_dir) / EVALS
    out.mkdir(exist_ok=True)
    n = 1 + max([int(p.name) for p in out.iterdir() if p.name.isdigit()] or [0])
    (out / str(n)).mkdir()
    return out / str(n)


# ----------------------------------------------------------------------------------------------
# Atomic writers: a kill leaves the old file or the new one, never a cut one


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: str | Path, header: list[str], rows) -> None:
    """rows: lists in header order, or dicts (extra keys ignored)."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([r.get(k) for k in header] if isinstance(r, dict) else r)
    write_text(path, buf.getvalue())


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o)}")


# ----------------------------------------------------------------------------------------------
# Reading


def _run_file_error():
    from cnnlab.errors import InputError

    class RunFileError(InputError, ValueError):
        """A file of a run folder that exists but cannot be read back (damaged, cut, edited by hand)."""

    return RunFileError


RunFileError = _run_file_error()


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a run's CSV with numbers parsed (INT_COLS as int, TEXT_COLS as text, the rest float; an empty
    or cut cell is None / NaN, 'nan'/'inf' kept as floats); [] when the file is missing. A damaged file (not
    UTF-8, more cells than the header) raises RunFileError naming it. The one parser of history.csv,
    steps.csv, predictions.csv and failures.csv."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                out = {}
                for k, v in r.items():
                    if k is None:  # more cells than the header has columns
                        raise ValueError(f"row {len(rows) + 2} has more cells than the header")
                    if k in TEXT_COLS:
                        out[k] = v
                    elif v is None or v == "":  # a short (cut) row
                        out[k] = None if k in INT_COLS else math.nan
                    elif k in INT_COLS:
                        out[k] = int(float(v))
                    else:
                        try:
                            out[k] = float(v)
                        except ValueError:
                            out[k] = v
                rows.append(out)
    except (UnicodeDecodeError, csv.Error, ValueError) as e:
        raise RunFileError(f"{path}: damaged, cannot be read back ({type(e).__name__}: {e}); restore it or "
                           "delete it") from None
    return rows


def columns(rows: list[dict]) -> dict:
    """Rows -> {column: list of values}."""
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def read_json(path: str | Path, kind: type = dict):
    """A run folder's JSON file (a `kind`: dict, or list for findings.json); None when missing;
    RunFileError naming it when damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFileError(f"{path}: damaged, not readable JSON ({type(e).__name__}: {e}); restore it or "
                           "delete it") from None
    if not isinstance(obj, kind):
        raise RunFileError(f"{path}: damaged, expected a JSON {'object' if kind is dict else kind.__name__}, "
                           f"found a {type(obj).__name__}")
    return obj


class RunDir:
    """One run folder, read lazily and typed. Every file is optional: a missing one reads as None / [] / {},
    so a report can show what there is. `RunDir(d, config=cfg, metrics=m)` seeds values the caller already
    holds (the trainer does not read back the config it just wrote)."""

    def __init__(self, path: str | Path, *, config=None, metrics: dict | None = None):
        self.dir = Path(path)
        if config is not None:
            self.__dict__["config"] = config
        if metrics is not None:
            self.__dict__["metrics"] = metrics

    def __repr__(self) -> str:
        return f"RunDir({str(self.dir)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def finished(self) -> bool:
        return (self.dir / METRICS).is_file()

    # -- the config
    @cached_property
    def config_text(self) -> str | None:
        p = self.dir / CONFIG
        return p.read_text(encoding="utf-8") if p.is_file() else None

    @cached_property
    def config(self):
        """The typed Config (cnnlab.config.load: validated); raises ConfigError / FileNotFoundError."""
        from cnnlab import config as C

        if self.config_text is None:
            raise FileNotFoundError(f"{self.dir}: not a run folder (no {CONFIG} in it)")
        return C.load(self.dir / CONFIG)

    @cached_property
    def config_dict(self) -> dict:
        """config.yaml as a plain mapping, not validated (a comparison must read runs of older versions)."""
        import yaml

        return (yaml.safe_load(self.config_text) or {}) if self.config_text else {}

    def load_config(self, overrides=None):
        """The config with dotted overrides applied (for eval and resume)."""
        from cnnlab import config as C

        if self.config_text is None:
            raise FileNotFoundError(f"{self.dir}: not a run folder (no {CONFIG} in it)")
        return C.load(self.dir / CONFIG, overrides)

    # -- JSON facts
    @cached_property
    def env(self) -> dict | None:
        return read_json(self.dir / ENV)

    @cached_property
    def data(self) -> dict | None:
        return read_json(self.dir / DATA)

    @cached_property
    def model_info(self) -> dict | None:
        return read_json(self.dir / MODEL)

    @cached_property
    def metrics(self) -> dict | None:
        return read_json(self.dir / METRICS)

    @cached_property
    def calibration(self) -> dict | None:
        """calibration.json: the temperature fitted on the validation split, with ECE/NLL before and after."""
        return read_json(self.dir / CALIBRATION)

    @property
    def temperature(self) -> float:
        """What the logits are divided by for calibrated probabilities (1.0 when the run was not calibrated)."""
        return float((self.calibration or {}).get("temperature") or 1.0)

    @cached_property
    def findings(self) -> list | None:
        return read_json(self.dir / FINDINGS, list)

    @property
    def seed(self) -> int:
        return int((self.config_dict.get("train") or {}).get("seed", 0) or 0)

    @property
    def params(self) -> int | None:
        return (self.model_info or {}).get("total_params")

    @property
    def seconds(self) -> float | None:
        return (self.env or {}).get("train_seconds")

    # -- tables
    @cached_property
    def history(self) -> list[dict]:
        """history.csv as rows (epoch an int, the rest floats)."""
        return read_csv(self.dir / HISTORY)

    @property
    def history_columns(self) -> dict:
        return columns(self.history)

    @cached_property
    def steps(self) -> list[dict]:
        return read_csv(self.dir / STEPS)

    @cached_property
    def predictions(self) -> list[dict]:
        """predictions.csv rows (PREDICTION_COLS)."""
        return read_csv(self.dir / PREDICTIONS_CSV)

    @cached_property
    def _prediction_arrays(self):
        import numpy as np

        p = self.dir / PREDICTIONS_NPZ
        if not p.is_file():
            return None, None
        with np.load(p) as z:
            return z["logits"], z["targets"]

    @property
    def logits(self):
        return self._prediction_arrays[0]

    @property
    def targets(self):
        return self._prediction_arrays[1]

    @cached_property
    def samples(self):
        """(images uint8 (N, C, H, W), index into the evaluated split) from samples.npz, or (None, None)."""
        import numpy as np

        p = self.dir / SAMPLES
        if not p.is_file():
            return None, None
        with np.load(p) as z:
            return z["images"], z["index"]

    @cached_property
    def gallery(self):
        """(images uint8 (N, C, H, W), labels, index into the training split) from gallery.npz, or None."""
        import numpy as np

        p = self.dir / GALLERY
        if not p.is_file():
            return None
        with np.load(p) as z:
            return z["images"], z["labels"], z["index"]

    # -- the model
    def checkpoint(self, which: str = "best") -> Path | None:
        p = checkpoint_path(self.dir, which)
        return p if p.is_file() else None

    def load_model(self, which: str = "best"):
        """The model rebuilt from config.yaml and data.json with the checkpoint's weights (read by
        checkpoint.load, weights_only), in eval mode on the CPU. Raises CheckpointError / FileNotFoundError."""
        import dataclasses

        from cnnlab.models import build_model
        from cnnlab.training import checkpoint as ckpt

        path = checkpoint_path(self.dir, which)
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir}: no {CHECKPOINTS}/{path.name}")
        d = self.data
        if not d:
            raise FileNotFoundError(f"{self.dir}: no {DATA}")
        # the checkpoint holds every weight: no pretrained download is needed (or wanted) to rebuild
        mcfg = dataclasses.replace(self.config.model, pretrained=None)
        model = build_model(mcfg, num_classes=d["num_classes"], in_channels=d["in_channels"],
                            input_size=d["input_size"])
        state = ckpt.load(path)
        state = state["model"] if "model" in state else state
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DistributedDataParallel wrappers
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
        model.load_state_dict(state)
        return model.eval()


Run = RunDir  # the Python API's name for a run (cnnlab.train returns one)


def load_run(path: str | Path, *, finished: bool = False) -> RunDir:
    """A run folder to read; FileNotFoundError naming the folder when it is not one (or, with finished=True,
    when it has no metrics.json yet)."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"run folder {str(d)!r} does not exist")
    if finished and not (d / METRICS).is_file():
        raise FileNotFoundError(f"{d}: not a finished run folder (no {METRICS} in it)")
    return RunDir(d)
