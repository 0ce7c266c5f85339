"""How a study's runs are trained: one after another in this process (inline), as parallel
`cnnlab train` subprocesses with their logs in the study folder (process), or on a Ray cluster (ray); also
the pieces a search reuses (spawn / ended / stop_all, ray_setup / unpack). Each executor takes (study
folder, [(Planned, "fresh" | "resume")]) and returns {run id: why it failed}; studies/study.py plans,
locks and writes the manifest around them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.rundir import made_by_cnnlab

if TYPE_CHECKING:
    from cnnlab.studies.study import Planned


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
