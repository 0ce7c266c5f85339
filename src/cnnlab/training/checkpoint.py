"""Atomic checkpoint files that hold only tensors and plain types, loaded with `weights_only=True`.

A save writes a temporary file beside the target, flushes and fsyncs it, then `os.replace`s it
over the target: at every instant the target is either the old file or the new one, never a mix.
A process killed mid-save (SIGKILL, power loss) leaves only a stale `.<name>.<random>.tmp`, which
`clean_stale_tmp` removes when the run resumes.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from cnnlab.errors import RunError


class CheckpointError(RunError, RuntimeError):
    """A checkpoint that cannot be written or is refused on loading (exit 1)."""


# What a checkpoint may contain: exactly what `torch.load(weights_only=True)` accepts back.
_PLAIN = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse (CheckpointError, naming the key) anything but tensors, plain types and containers of them."""
    if type(obj) is torch.Tensor or isinstance(obj, _PLAIN):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot go into a checkpoint; "
                          "only tensors, numbers, strings and lists/dicts of them are saved (so that "
                          "torch.load(weights_only=True) can read the file back)")


def _create_tmp(path: Path) -> tuple[int, str]:
    """A new, empty `.<name>.<random>.tmp` beside `path`, created with the umask's permissions
    (tempfile.mkstemp's 0600 would make checkpoints unreadable to the rest of a team)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise CheckpointError(f"cannot create a temporary file in {path.parent}")


def atomic_save(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, flush, fsync, then os.replace.

    If anything fails (pickling, a full disk, a signal), the temporary file is removed and the
    previous file at `path` is untouched. Only plain types and tensors are admitted, so
    `weights_only=True` loads it.
    """
    check_plain(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: as they are
            raise
        cause = _root_os_error(e) or e  # torch.save reports a full disk as "unexpected pos ..."
        raise CheckpointError(f"could not save {path}: {type(cause).__name__}: {cause}. "
                              f"The previous {path.name}, if any, is untouched.") from cause
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _root_os_error(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def is_stale_tmp(name: str) -> bool:
    """`.last.pt.3f9c0a1b.tmp`: what `atomic_save` leaves behind when killed mid-write."""
    return name.startswith(".") and name.endswith(".tmp") and ".pt." in name


def clean_stale_tmp(folder: str | Path) -> list[str]:
    """Remove temporary files of interrupted saves in `folder`; returns their names."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if is_stale_tmp(p.name) and p.is_file():
                try:
                    p.unlink()
                    removed.append(p.name)
                except FileNotFoundError:
                    pass
    return sorted(removed)


def load(path: str | Path, map_location="cpu") -> dict:
    """A checkpoint read with `weights_only=True`: a file holding code (a pickled object with a
    __reduce__ payload) is refused before anything in it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses code; a damaged file fails to unzip
        raise CheckpointError(f"{path}: refused, not a loadable cnnlab checkpoint (only tensors and plain types "
                              f"are accepted, read with weights_only=True): {_why(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: refused, expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _why(e: Exception) -> str:
    """The informative line of torch.load's error (not its advice to retry with weights_only=False)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "Unsupported" in ln:
            return ln
    if lines and not lines[0].startswith("Weights only load failed"):
        return lines[0]
    return f"{type(e).__name__} (a damaged file, or not a checkpoint)"


def load_weights(module: torch.nn.Module, weights, path: str | Path, what: str = "model") -> None:
    """`module.load_state_dict(weights)`, refusing (CheckpointError naming `path`) what is not a dict of
    tensors, holds NaN or infinite values, or belongs to another model."""
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CheckpointError(f"{path}: refused, its {what!r} entry is not a dict of named tensors (a damaged "
                              "or foreign checkpoint)")
    if not all_finite(weights):
        raise CheckpointError(f"{path}: refused, its {what} weights hold NaN or infinite values")
    try:
        module.load_state_dict(weights)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused, its {what} weights do not fit this run's model (another "
                              f"model's checkpoint?): {first}") from None


def all_finite(state_dict: dict) -> bool:
    return all(torch.isfinite(v).all().item() for v in state_dict.values()
               if torch.is_tensor(v) and v.is_floating_point())


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def check_free_space(folder: str | Path, need: int) -> None:
    """Refuse to start (CheckpointError naming the folder and both numbers) when `folder`'s disk has
    less than `need` bytes free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise CheckpointError(
            f"not enough free disk space for checkpoints in {folder}: {free / 2**20:.1f} MiB free "
            f"({free} bytes), a checkpoint needs about {need / 2**20:.1f} MiB ({need} bytes). "
            "Free some space or choose another output.dir.")


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"], "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
