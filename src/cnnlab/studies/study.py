"""Studies: each variation x grid point x seed of one config trained into its own fixed run folder under one
study folder (marked by rundir as a study), with a study.json manifest; run in this process, as parallel
subprocesses or on Ray, resumable (only what is missing runs again), then compared by studies/compare.py
(study.html / study.md). Imports compare one way; compare never imports this module."""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.errors import RunError
from cnnlab.rundir import MARKER, made_by_cnnlab
from cnnlab.studies import compare
from cnnlab.studies.compare import IGNORED, STUDY_KEYS, fmt_value


class StudyError(RunError, RuntimeError):
    """Some runs of a study failed, or the study folder is busy; the message says which and where to look."""

    label = ""  # the message itself opens with what failed


@dataclass
class Planned:
    """One run of a study: its folder (relative to the study folder), group, seed and resolved config."""

    id: str  # "main" or "main/seed-1"
    variation: str
    seed: int
    overrides: dict
    cfg: C.Config


@dataclass
class Study:
    dir: Path
    config: C.Config
    runs: list[Planned]
    status: dict[str, str] = field(default_factory=dict)  # run id -> done | partial | pending | failed
    report: Path | None = None


# ----------------------------------------------------------------------------------------------
# Planning: names, overrides, resolved configs


def groups(cfg: C.Config) -> list[tuple[str, dict]]:
    """(name, dotted overrides) of each variation x grid point, in config order."""
    base = [(str(n), C.flatten(ov or {})) for n, ov in cfg.variations.items()] or [("", {})]
    keys = list(cfg.grid)
    lasts = [k.split(".")[-1] for k in keys]
    short = {k: (s if lasts.count(s) == 1 else k) for k, s in zip(keys, lasts)}
    out = []
    for vname, ov in base:
        for point in itertools.product(*(cfg.grid[k] for k in keys)):
            parts = [vname] * bool(vname) + [f"{short[k]}={fmt_value(v)}" for k, v in zip(keys, point)]
            name = "+".join(parts) or "main"
            out.append((name.replace("/", "_").replace(" ", "_"), {**ov, **dict(zip(keys, point))}))
    for name, _ in out:  # a run's folder is <study>/<name>: `..` or `.` would be output.dir or the study itself
        if name in (".", "..") or name.startswith(".") or any(c in name for c in "\\\0"):
            raise C.ConfigError(f"variation name {name!r}: must be a plain folder name (not starting with '.', "
                                "without '\\'): it names the run's folder inside the study folder")
    if len({n for n, _ in out}) != len(out):
        raise C.ConfigError(f"variation names must be unique, got {[n for n, _ in out]}")
    for name, ov in out:
        bad = [k for k in ov if k.split(".")[0] in STUDY_KEYS or k.startswith("output.")]
        if bad:
            raise C.ConfigError(f"variation {name!r}: {', '.join(bad)} cannot differ between the runs of a study")
    return out


def study_dir(cfg: C.Config) -> Path:
    name = cfg.output.name or "study"
    if name in (".", "..") or "/" in name or "\\" in name:
        raise C.ConfigError(f"output.name={name!r}: a study's name must be a plain folder name (the study folder "
                            "is output.dir/<name>)")
    return Path(cfg.output.dir) / name


def baseline_of(cfg: C.Config, names: list[str]) -> str:
    import difflib

    if cfg.baseline is None or cfg.baseline in names:
        return cfg.baseline or names[0]
    hint = "".join(f" Did you mean {c!r}?" for c in difflib.get_close_matches(cfg.baseline, names, n=1))
    raise C.ConfigError(f"baseline={cfg.baseline!r} is not a variation of this study.{hint} "
                        f"Variations: {', '.join(names)}")


def plan(cfg: C.Config) -> list[Planned]:
    """Every run of the study with its resolved single-run config (validated up front, names too)."""
    from cnnlab.training.experiment import check_names

    root, out = study_dir(cfg), []
    tree = {k: v for k, v in C.to_dict(cfg).items() if k not in STUDY_KEYS}
    for name, ov in groups(cfg):
        for r in range(cfg.repeats):
            seed = cfg.train.seed + r
            rid = name if cfg.repeats == 1 else f"{name}/seed-{seed}"
            fixed = {**ov, "train.seed": seed, "output.dir": str((root / rid).parent), "output.name": Path(rid).name}
            try:
                rcfg = C.load(tree, fixed)
                check_names(rcfg)
            except C.ConfigError as e:
                raise C.ConfigError(f"variation {name!r} ({', '.join(f'{k}={fmt_value(v)}' for k, v in ov.items())}): "
                                    f"{str(e).removeprefix('config: ')}") from None
            out.append(Planned(rid, name, seed, ov, rcfg))
    return out


def variation(cfg: C.Config, name: str, flag: str = "--variation") -> list[Planned]:
    """The planned run(s) of one variation (one per seed); refused, naming the variations, when there is none."""
    if not (cfg.variations or cfg.grid or cfg.repeats > 1):
        raise C.ConfigError(f"{flag} {name!r}: the config is not a study (it has no variations, grid or repeats)"
                            + ("; a search's trials are chosen as it goes" if cfg.search else ""))
    planned = plan(cfg)
    chosen = [p for p in planned if p.variation == name]
    if not chosen:
        import difflib

        names = list(dict.fromkeys(p.variation for p in planned))
        close = difflib.get_close_matches(name, names, n=1)
        raise C.ConfigError(f"{flag} {name!r} is not a variation of this study."
                            + (f" Did you mean {close[0]!r}?" if close else "") + f" Variations: {', '.join(names)}")
    return chosen


def differences(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two flat config dicts (ignoring IGNORED)."""
    return [k for k in sorted(set(a) | set(b)) if not k.startswith(IGNORED) and a.get(k) != b.get(k)]


def run_state(path: Path) -> str:
    """done when metrics.json exists (written after evaluation), partial when the folder exists, else pending."""
    return "done" if (path / R.METRICS).is_file() else "partial" if path.exists() else "pending"


def _saved_config(path: Path) -> dict | None:
    try:
        return C.flatten(C.to_dict(R.RunDir(path).config))
    except (C.ConfigError, OSError):
        return None


# ----------------------------------------------------------------------------------------------
# Running


def run_study(cfg: C.Config, *, jobs: int = 1, config_path: str | None = None, overrides=None, quiet: bool = False,
              executor: str = "auto", address: str | None = None, report: bool = True) -> Study:
    """Train every missing run of a study (finished ones are kept untouched), then write study.json and the
    study report. executor: auto (inline for jobs=1, else process) | inline | process | ray.

    Under torchrun every process runs this: rank 0 plans, locks and writes the study files; each run is
    trained by all processes together (DDP), one run after another."""
    from cnnlab import dist

    if cfg.search:  # a hyperparameter search: its trials are the runs (studies/search.py)
        from cnnlab.studies import search

        return search.run_search(cfg, jobs=jobs, config_path=config_path, overrides=overrides, quiet=quiet,
                                 executor=executor, address=address, report=report)
    main = dist.is_main()
    say = (lambda *a: None) if quiet or not main else (lambda *a: print(*a, flush=True))
    planned = plan(cfg)
    names = list(dict.fromkeys(p.variation for p in planned))
    base = baseline_of(cfg, names)
    root, kind = study_dir(cfg), executor if executor != "auto" else ("process" if jobs > 1 else "inline")
    if jobs < 1 or kind not in EXECUTORS:
        raise C.ConfigError(f"--jobs {jobs} --executor {executor}: jobs must be >= 1, the executor one of auto, "
                            f"{', '.join(EXECUTORS)}")
    if dist.world()[2] > 1:
        if kind != "inline":
            raise C.ConfigError(f"--jobs {jobs} --executor {executor}: under torchrun a study trains its runs one "
                                "after another, each on every process; leave out --jobs and --executor")
        from cnnlab import process

        process.setup(cfg)  # the process group, before rank 0 plans and broadcasts
    if main:
        _check_study_folder(root)
        root.mkdir(parents=True, exist_ok=True)
        R.mark(root, "study")
    with _lock(root) if main else contextlib.nullcontext():
        todo, status = _plan_todo(root, cfg, planned, base, executor, config_path, overrides, say) if main else ([], {})
        say(f"study {root}: {len(names)} variation(s) x {cfg.repeats} seed(s) = {len(planned)} runs; "
            f"{len(planned) - len(todo)} done, {len(todo)} to run")
        if dist.active():  # every rank trains the same runs, in the same mode
            by_id = {p.id: p for p in planned}
            todo = [(by_id[i], mode) for i, mode in dist.broadcast_object([(p.id, m) for p, m in todo])]
        failures = EXECUTORS[kind](root, todo, jobs=jobs, quiet=quiet, say=say, address=address) if todo else {}
        out = Study(dir=root, config=cfg, runs=planned, status=status)
        if main:
            for rid in [k for k in failures if run_state(root / k) == "done"]:  # e.g. its own report.html failed
                say(f"warning: {rid} was trained and evaluated (metrics.json), but then: {failures.pop(rid)}")
            for p in planned:
                status[p.id] = "failed" if p.id in failures else run_state(root / p.id)
            write_manifest(root, cfg, planned, base, status, failures, config_path, overrides)
            if report and any(s == "done" for s in status.values()):
                out.report = compare.compare([root], out=root, baseline=base)
                say(f"study report: {out.report}")
    if failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        raise StudyError(f"{len(failures)} of {len(planned)} runs of {root} failed:\n{lines}\n"
                         "Fix the cause and run the same command again: finished runs are kept.")
    return out


def _check_study_folder(root: Path) -> None:
    """A study writes study.*, configs/, logs/ and a folder per run into its folder: refuse an existing folder
    that holds other things and is not a study's (no study.yaml / study.json), before anything is written."""
    if not root.is_dir() or (root / R.STUDY_YAML).is_file() or (root / R.STUDY_JSON).is_file():
        return
    other = sorted(p.name for p in root.iterdir() if p.name not in (R.LOCK, R.MARKER))
    if other:
        raise C.ConfigError(f"{root}: not a study folder (no study.yaml or study.json; it holds "
                            f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); a study writes its files and "
                            "one folder per run there. Choose another output.dir or output.name; nothing was changed.")


def _plan_todo(root: Path, cfg, planned, base, executor, config_path, overrides, say) -> tuple[list, dict]:
    """The runs still to train, each fresh or resumed; a partial run that cannot be resumed is removed."""

    foreign = [str(root / p.id) for p in planned if run_state(root / p.id) == "partial"
               and not made_by_cnnlab(root / p.id) and _saved_config(root / p.id) is None]
    if foreign:  # never replace what cnnlab did not make (a class folder of images, another tool's output)
        raise C.ConfigError(f"{', '.join(foreign)}: {'this folder is' if len(foreign) == 1 else 'these folders are'} "
                            f"where runs of this study go, but not made by cnnlab (no {MARKER} in it); nothing was "
                            "changed. Move it away, or choose another output.dir, output.name or variation name.")
    R.write_text(root / R.STUDY_YAML, C.dump_yaml(cfg))
    todo, status = [], {}
    for p in planned:
        path = root / p.id
        state = status[p.id] = run_state(path)
        saved = _saved_config(path) if state != "pending" else None
        diff = differences(saved, C.flatten(C.to_dict(p.cfg))) if saved is not None else []
        if p.cfg.optim.lr == "auto":  # the run saved the rate the range test chose
            diff = [k for k in diff if k != "optim.lr"]
        if state == "done":
            if diff:
                say(f"warning: {p.id} was trained with a different config ({', '.join(diff)}); "
                    f"it is kept; delete {path} to train it again")
            continue
        mode = "fresh"
        if state == "partial":
            resumable = saved is not None and not diff and R.checkpoint_path(path, "last").is_file()
            if resumable and executor != "ray":  # (Ray workers start from scratch)
                mode = "resume"
            elif made_by_cnnlab(path):
                shutil.rmtree(path)  # a run cnnlab started, with nothing resumable in it: start it cleanly
            else:
                raise C.ConfigError(f"{path}: a partial run of this study that cannot be resumed, made before "
                                    f"run folders were marked ({MARKER}); delete it to train it again")
        todo.append((p, mode))
    write_manifest(root, cfg, planned, base, status, {}, config_path, overrides)
    return todo, status


def write_manifest(root: Path, cfg, planned, base, status, failures, config_path, overrides) -> None:
    variations = []
    for name, ov in groups(cfg):
        runs = [p for p in planned if p.variation == name]
        variations.append({"name": name, "overrides": ov, "config": C.to_dict(runs[0].cfg),
                           "runs": [{"seed": p.seed, "dir": p.id, "status": status.get(p.id, "pending"),
                                     **({"error": failures[p.id]} if p.id in failures else {})} for p in runs]})
    R.write_json(root / R.STUDY_JSON, {
        "name": root.name, "baseline": base, "repeats": cfg.repeats,
        "seeds": [cfg.train.seed + r for r in range(cfg.repeats)], "grid": cfg.grid,
        "source": {"config": str(config_path) if config_path else None, "overrides": list(overrides or [])},
        "complete": all(s == "done" for s in status.values()), "variations": variations})


def _lock(root: Path):
    """An exclusive lock on the study folder (the one run folders have): two processes never run one study."""
    return R.lock(root, "running the study in", StudyError)


def _done_line(root: Path, p: Planned, seconds: float) -> str:
    import json

    try:
        m = json.loads((root / p.id / R.METRICS).read_text())
        return f"  {p.id}: test accuracy {m['test']['accuracy']:.4f} ({seconds:.0f} s)"
    except (OSError, ValueError, KeyError):
        return f"  {p.id}: finished ({seconds:.0f} s)"


def run_inline(root: Path, todo, *, quiet: bool, say, **_) -> dict:
    """One run after another in this process."""
    from cnnlab import process
    from cnnlab.training import experiment

    failures = {}
    for i, (p, mode) in enumerate(todo, 1):
        say(f"[{i}/{len(todo)}] {p.id}" + (" (resuming)" if mode == "resume" else ""))
        t0 = time.perf_counter()
        try:
            # each run sets up the process for its own config (a variation may change train.threads, device...)
            experiment.run(p.cfg, device=process.setup(p.cfg), resume_dir=root / p.id if mode == "resume" else None,
                           quiet=quiet)
        except Exception as e:  # one broken variation must not stop the others
            failures[p.id] = f"{type(e).__name__}: {e}"
            say(f"  {p.id}: {failures[p.id]}")
            continue
        say(_done_line(root, p, time.perf_counter() - t0))
    return failures


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM (checkpoint, exit) when the study process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_processes(root: Path, todo, *, jobs: int, say, **_) -> dict:
    """Up to `jobs` runs at a time, each `python -m cnnlab train <config>` with cores/jobs torch threads;
    the output of each goes to <study>/logs/<run>.log."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue, running, failures = list(todo), {}, {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                p, mode = queue.pop(0)
                running[spawn(root, p, mode, threads)] = (p, time.perf_counter())
                say(f"started {p.id}" + (" (resuming)" if mode == "resume" else "") + f" [{threads} threads]")
            time.sleep(0.2)
            for proc in [q for q in running if q.poll() is not None]:
                p, t0 = running.pop(proc)
                error = ended(root, p, proc)
                if error is None:
                    say(_done_line(root, p, time.perf_counter() - t0))
                else:
                    failures[p.id] = error
                    say(f"  {p.id} failed ({failures[p.id]})")
    except BaseException:  # Ctrl-C / SIGTERM of the study: let every run save a checkpoint and stop
        stop_all(running)
        raise
    return failures


def spawn(root: Path, p: Planned, mode: str, threads: int, extra: list[str] = ()) -> subprocess.Popen:
    """`python -m cnnlab train` for one run (its config in <study>/configs/, or --resume), with `threads` torch
    threads and its output appended to <study>/logs/<run>.log; dies with this process."""
    (root / R.STUDY_CONFIGS).mkdir(exist_ok=True)
    (root / R.STUDY_LOGS).mkdir(exist_ok=True)
    slug = p.id.replace("/", "__")
    cfg_file = root / R.STUDY_CONFIGS / f"{slug}.yaml"
    cfg_file.write_text(C.dump_yaml(p.cfg))
    args = ["--resume", str(root / p.id)] if mode == "resume" else [str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(root / R.STUDY_LOGS / f"{slug}.log", "a") as log:
        return subprocess.Popen([sys.executable, "-m", "cnnlab", "train", *args, *extra], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)


def ended(root: Path, p: Planned, proc: subprocess.Popen) -> str | None:
    """None when the run's process succeeded, else what failed (the exit code and its log's last lines)."""
    if proc.returncode == 0:
        return None
    tail = (root / R.STUDY_LOGS / f"{p.id.replace('/', '__')}.log").read_text().strip().splitlines()[-3:]
    return f"exit code {proc.returncode}: " + " | ".join(tail)


def stop_all(procs) -> None:
    """SIGTERM every run's process (each saves a checkpoint and exits), then wait up to 60 s for each."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ray_task(cfg_dict: dict, name: str, threads: int, trial: dict | None = None) -> bytes:  # on a Ray worker
    """Train one run in a temporary folder on the worker; return the run folder as a .tar.gz. `trial`: a
    search trial's storage and pruner (studies/search.py), reported to every epoch."""
    import io
    import tarfile
    import tempfile

    import torch

    from cnnlab import process
    from cnnlab.training import experiment

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # what cnnlab.threads.choose keeps when train.threads is unset
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.load(cfg_dict, {"output.dir": tmp, "output.name": name})
        hook = None
        if trial is not None:
            from cnnlab.studies import search

            hook = search.epoch_hook(trial)
        run = experiment.run(cfg, device=process.setup(cfg), quiet=True, on_epoch=hook)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(run.dir, arcname=name)
        return buf.getvalue()


def run_ray(root: Path, todo, *, jobs: int, say, address: str | None = None, **_) -> dict:
    """Send every run to a Ray cluster (`ray.init(address)`; RAY_ADDRESS or a local instance when None) and
    unpack each returned run folder into place. Workers need cnnlab installed and the data at data.root."""
    ray, started, task, threads, what = ray_setup(len(todo), jobs, address)
    refs = {task.remote(C.to_dict(p.cfg), p.id.replace("/", "__"), threads): p for p, _ in todo}
    say(f"sent {len(refs)} runs to Ray ({what})")
    failures = {}
    try:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            p = refs.pop(ready[0])
            error = unpack(root, p, ready[0])
            if error:
                failures[p.id] = error
                say(f"  {p.id} failed: {failures[p.id]}")
                continue
            say(_done_line(root, p, 0).replace(" (0 s)", ""))
    finally:
        if started:
            ray.shutdown()
    return failures


def unpack(root: Path, p: Planned, ref) -> str | None:
    """Put the run folder a Ray task returned (`ref`) in place, whole; None, or what failed."""
    import io
    import tarfile

    import ray

    try:
        blob = ray.get(ref)
    except Exception as e:  # a RayTaskError wraps the worker's exception
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    incoming = root / f".incoming-{p.id.replace('/', '__')}"
    shutil.rmtree(incoming, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(incoming, filter="data")
    run_dir = incoming / p.id.replace("/", "__")
    R.write_text(run_dir / R.CONFIG, C.dump_yaml(p.cfg))  # the study's paths, not the worker's
    (root / p.id).parent.mkdir(parents=True, exist_ok=True)
    if (root / p.id).exists() and not made_by_cnnlab(root / p.id):  # appeared while the run trained
        return f"{root / p.id} was made meanwhile, not by cnnlab; the run is kept in {incoming}"
    shutil.rmtree(root / p.id, ignore_errors=True)
    os.replace(run_dir, root / p.id)  # appears whole, never half-unpacked
    shutil.rmtree(incoming)
    return None


def ray_setup(todo_count: int, jobs: int, address: str | None):
    """(ray, started here, the remote task, threads per run, a description) for a cluster (`ray.init(address)`;
    RAY_ADDRESS or a local instance when None): --jobs N runs at a time, by default all at once."""
    try:
        import ray
    except ImportError:
        raise C.ConfigError("--executor ray needs Ray: pip install 'cnnlab[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    # A run never spans nodes.
    node_cpus = max([n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")] or [1])
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = int(max(1, min(node_cpus, cpus // (jobs if jobs > 1 else min(todo_count, cpus)))))
    # Ray hides GPUs from a task that does not ask for one: on a cluster with GPUs each run gets a whole one
    gpus = int(ray.cluster_resources().get("GPU", 0))
    task = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0)(_ray_task)
    what = (f"{threads} CPUs{' and 1 GPU' if gpus else ''} each, {cpus} CPUs"
            f"{f' and {gpus} GPUs' if gpus else ''} in the cluster")
    return ray, started, task, threads, what


EXECUTORS = {"inline": run_inline, "process": run_processes, "ray": run_ray}


# `cnnlab compare` lives in studies/compare.py, its parser beside it (cli.py imports compare.add_parser).
