"""torchrun / DistributedDataParallel plumbing: who am I, only rank 0 writes, gather evaluation.

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


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
