"""torchrun / DistributedDataParallel plumbing: who am I, only rank 0 writes, gather evaluation, stop on a signal.

Launched by `torchrun --nproc_per_node N -m cnnlab train CONFIG`, every process reads RANK,
LOCAL_RANK and WORLD_SIZE from its environment and joins one process group: NCCL on GPUs (one GPU
per process, cuda:LOCAL_RANK), gloo on CPUs. Without torchrun everything here is a no-op.

Collectives time out after CNNLAB_DIST_TIMEOUT seconds (default 1800, PyTorch's own default): long
enough for rank 0 to write a large checkpoint or the report while the others wait. A rank that
dies is noticed much sooner: its peers' next collective fails with "Connection closed by peer"
and torchrun then stops every process.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> bool:
    """Join the process group when launched by torchrun with more than one process."""
    rank, local_rank, size = world()
    if size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is imported,
    # and DistributedDataParallel imports it: imported after the group exists, it holds 10 references to
    # it forever, destroy_process_group cannot free it, and gloo's threads live on into interpreter exit,
    # where they raced the peer's exit and aborted a finished rank now and then ("terminate called
    # without an active exception", SIGABRT). Imported first, it binds None and the group is freed.
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("CNNLAB_DIST_TIMEOUT", 1800))))
    return True


def is_main() -> bool:
    return world()[0] == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL reduces only CUDA tensors, gloo CPU (and CUDA) ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks, in place (also returned); a no-op without a process group."""
    if active():
        dev = _comm_device(t)
        if dev == t.device:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            moved = t.to(dev)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            t.copy_(moved.to(t.device))
    return t


def flags(local: bool) -> list[bool]:
    """Every rank's value of `local`, in rank order (one small collective)."""
    if not active():
        return [bool(local)]
    t = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    t[dist.get_rank()] = float(bool(local))
    return [bool(v) for v in all_reduce_sum(t).tolist()]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) tensor in rank order; blocks may differ in length."""
    if not active():
        return t
    home = t.device
    t = t.to(_comm_device(t))
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = torch.zeros((top - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    out = [torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    dist.all_gather(out, torch.cat([t, pad]))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).to(home)


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def local_main_first():
    """The body runs in each node's first process (LOCAL_RANK 0) before the others, which wait and then
    find its downloads and decoded caches in place: one writer per node, no two processes downloading
    the same archive (the pattern of torchvision's references)."""
    first = world()[1] == 0
    if active() and not first:
        barrier()
    try:
        yield
    finally:
        if active() and first:
            barrier()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Signals: every rank stops after the same step; none waits forever for a rank that is gone


# Seconds a rank of a distributed run may take, after SIGTERM/SIGINT, to reach a step boundary and
# (rank 0) save; past it the process exits anyway. torchrun itself sends SIGKILL 30 s after SIGTERM.
DIST_SIGNAL_GRACE_S = 20.0


class SignalGuard:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits 143/130.

    A second signal stops at once (KeyboardInterrupt, exit 130). In a distributed run the flag is
    shared at each step boundary through the step's all-reduce, so every rank stops after the same
    step and rank 0 saves (no collective is needed to save). A rank whose peers are gone or hung
    would wait in a collective instead of reaching that boundary; a watchdog thread ends it after
    DIST_SIGNAL_GRACE_S seconds with the signal's exit code, so no rank outlives the group.
    """

    def __init__(self, distributed: bool = False):
        self.signum: int | None = None
        self.distributed = distributed
        self._old = {}
        self._done = threading.Event()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self.distributed:
            threading.Thread(target=self._watchdog, args=(exit_code(signum),), daemon=True).start()

    def _watchdog(self, code: int) -> None:
        if self._done.wait(DIST_SIGNAL_GRACE_S):
            return
        print(f"cnnlab: rank {world()[0]}: no clean stop {DIST_SIGNAL_GRACE_S:.0f} s after the signal "
              f"(a collective is waiting for a rank that is gone); exiting with {code}", file=sys.stderr, flush=True)
        os._exit(code)

    def code(self) -> int | None:
        """This process's exit code for the signal received (143 SIGTERM, 130 SIGINT), None without one."""
        return None if self.signum is None else exit_code(self.signum)

    def __exit__(self, exc_type, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        if exc_type is None or issubclass(exc_type, SystemExit):  # stopped cleanly: no watchdog needed
            self._done.set()


def exit_code(signum: int) -> int:
    return 143 if signum == signal.SIGTERM else 130


def stop_code(guard: SignalGuard) -> int | None:
    """The exit code if any rank was signalled (one small collective when distributed)."""
    if not active():
        return guard.code()
    t = torch.tensor([guard.code() == 143, guard.code() == 130], dtype=torch.float64)
    all_reduce_sum(t)
    return 143 if t[0] > 0 else 130 if t[1] > 0 else None
