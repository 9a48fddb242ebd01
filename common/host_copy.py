"""Copies of (nested) training state on the host: snapshots the training cannot change, safe to
pickle to another rank (a CUDA tensor would land on its GPU there)."""
from __future__ import annotations

import copy

import torch


def to_cpu(state):
    """A copy of a (nested) state with every tensor on the CPU."""
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
        return type(state)(copy_to_host(v, e) for v, e in zip(state, earlier, strict=True))
    return copy.deepcopy(state)
