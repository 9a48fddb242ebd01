"""Checkpoint files: atomic writes, and a clear error for a file that is not one of ours."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp-<pid>`, then rename: a process killed while saving never leaves a
    truncated file where a good checkpoint was, and the next start removes what it left
    (`remove_stale_writes`). Local files are written here directly: Lightning's own save stages them
    in the system temp folder, where a kill left them behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def remove_stale_writes(folder: Path) -> None:
    """Delete the `*.tmp-<pid>` files in `folder` whose writing process is gone (killed while saving)."""
    for path in folder.glob("*.tmp-*") if folder.is_dir() else ():
        pid = path.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code runs); raise naming the file if it is unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"Checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def to_cpu(state):
    """A copy of a (nested) state with every tensor on the CPU: a snapshot the training cannot
    change, and safe to pickle to another rank (a CUDA tensor would land on its GPU there)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return copy.deepcopy(state)


def copy_to_host(state, into=None):
    """`to_cpu` without stalling the GPU: GPU tensors are copied with non-blocking copies into pinned
    host buffers, reused from `into` (an earlier result for the same structure) where shapes and
    dtypes match, so a periodic snapshot allocates once. Record a CUDA event after it and wait on that
    event before reading the copy. The result never shares memory with `state`."""
    if isinstance(state, torch.Tensor):
        source = state.detach()
        if not (isinstance(into, torch.Tensor) and into.shape == source.shape and into.dtype == source.dtype):
            into = torch.empty(source.shape, dtype=source.dtype, pin_memory=source.is_cuda)
        return into.copy_(source, non_blocking=source.is_cuda)
    if isinstance(state, dict):
        earlier = into if isinstance(into, dict) else {}
        return {k: copy_to_host(v, earlier.get(k)) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        earlier = into if isinstance(into, (list, tuple)) and len(into) == len(state) else [None] * len(state)
        return type(state)(copy_to_host(v, e) for v, e in zip(state, earlier))
    return copy.deepcopy(state)
