"""CPU thread policy: OpenMP's wait policy and the number of intra-op threads, chosen so that a machine
shared with other programs slows a run in proportion to the load rather than fivefold.

Measured by benchmarks/contention.py (the quickstart alone and beside two PyTorch processes that
multiply matrices): with PyTorch's defaults (OpenMP threads spin while they wait, one thread per core
whatever else runs) the quickstart slowed 4.2x beside them; with waiting threads that sleep
(OMP_WAIT_POLICY=PASSIVE) and one thread per core not busy at that moment, 2.7x (README, Speed).
`prefer_passive_wait` must run before torch is imported (OpenMP reads its environment when it loads):
the entry points (`cnnlab`, `python -m cnnlab`) call it first. `apply` runs where the process is set up.
"""
from __future__ import annotations

import os
import statistics
import time


def prefer_passive_wait(env=os.environ) -> None:
    """OpenMP threads that sleep while they wait (unless the user chose a policy): a spinning thread
    burns the time slice the thread it waits for needs, when the cores are shared."""
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def runnable_now(samples: int = 5, gap: float = 0.01, path: str = "/proc/loadavg") -> float | None:
    """Threads running or ready to run on the machine at this moment, this one included: the kernel's count
    (the fourth field of /proc/loadavg, "runnable/total"), the median of a few samples `gap` seconds apart.
    None where there is no such file (not Linux). Unlike the load averages it does not lag: two training
    processes started a second ago count, and a load that ended a second ago does not."""
    counts = []
    for i in range(samples):
        try:
            with open(path) as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(gap)
    return statistics.median(counts)


def busy_elsewhere() -> float:
    """Threads other programs keep busy now: `runnable_now()` less this one, else (not Linux) the 1-minute
    load average."""
    now = runnable_now()
    if now is not None:
        return max(0.0, now - 1)
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """One thread per core that is not already busy: the cores less the threads other programs keep busy
    (`busy_elsewhere()`, rounded), at least 1. On an idle machine that is every core, as PyTorch's default."""
    cores = available_cores() if cores is None else cores
    if load is None:
        load = busy_elsewhere()
    return max(1, min(cores, round(cores - load)))


def choose(requested: int | None, env=os.environ) -> int:
    """train.threads when set, else OMP_NUM_THREADS when the caller set it (a study's parallel jobs do),
    else `default_threads()`."""
    if requested:
        return requested
    value = env.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return default_threads()


def apply(requested: int | None) -> int:
    """Set torch's intra-op thread count per `choose` and return it."""
    import torch

    n = choose(requested)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
