"""torchrun / DistributedDataParallel plumbing: who am I, only rank 0 writes, gather evaluation."""
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
    rank, _, size = world()
    if size <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("CNNLAB_DIST_TIMEOUT", 120))))
    return True


def is_main() -> bool:
    return world()[0] == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (n_r, ...) tensor in rank order; blocks may differ in length."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    pad = torch.zeros((top - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    out = [torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
    dist.all_gather(out, torch.cat([t, pad]))
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
