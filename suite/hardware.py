"""Turn `device=auto|cuda|cpu|mps` and `precision=auto|...` into Trainer arguments.

Asking for a GPU on a machine without one is not an error: the run continues on CPU and says
so in one line, so the same command works on a laptop and on a GPU node.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

VALID_DEVICES = ("auto", "cuda", "gpu", "cpu", "mps")


def resolve_accelerator(device: str) -> str:
    device = str(device).lower()
    if device not in VALID_DEVICES:
        raise ValueError(f"device={device!r} is not valid; choose one of {', '.join(VALID_DEVICES)}")
    if device in ("auto", "cuda", "gpu"):
        if torch.cuda.is_available():
            return "gpu"
        log.warning("No CUDA GPU found: training on CPU with full precision.")
        return "cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        log.warning("MPS is not available: training on CPU with full precision.")
        return "cpu"
    return device


def resolve_precision(precision: str, accelerator: str) -> str:
    precision = str(precision)
    if precision != "auto":
        if accelerator == "cpu" and precision.startswith("16"):
            log.warning("precision=%s is not supported on CPU; using 32-true.", precision)
            return "32-true"
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"
