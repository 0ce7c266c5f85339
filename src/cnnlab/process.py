"""Setting up this process for training, once, at the entry points (the CLI, `cnnlab.train`, a study's
runner, `cnnlab eval`): torch threads, determinism, the device and, under torchrun, the process group.

Everything below (experiment.run, training.loop.fit, evaluate_weights) receives the device and sets
none of these itself (torchvision's `init_distributed_mode`, nanoGPT's first block).
"""
from __future__ import annotations

import os

import torch

from cnnlab import dist, threads
from cnnlab.config import Config, ConfigError


def setup(cfg: Config) -> torch.device:
    """Threads, determinism, the device and the process group per `cfg.train`; returns the device.

    Safe to call again (a study's next run): the process group is made once, determinism once on stays on.
    """
    t = cfg.train
    configure_determinism(t.deterministic)  # first: CUBLAS_WORKSPACE_CONFIG must precede any CUDA work
    threads.apply(t.threads)  # train.threads, else one per core not already busy (cnnlab/threads.py)
    device = pick_device(t.device)
    if device.type == "cuda" and not t.deterministic:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dist.init(device)  # under torchrun with more than one process; a no-op otherwise
    return device


def pick_device(name: str) -> torch.device:
    """The training device; under torchrun a bare 'cuda' (or 'auto') means this process's GPU, cuda:LOCAL_RANK."""
    local_rank = dist.world()[1]
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine; use train.device=cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def configure_determinism(deterministic: bool) -> None:
    """`train.deterministic: true`: PyTorch's deterministic algorithms (an error names any op that has
    none). CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, so this runs before any CUDA work.
    It stays on for the rest of the process, so the final evaluation is deterministic too. On CPU, runs
    are reproducible without it."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
