"""Learning-rate schedules as factories `f(optimizer, total_steps, **config)`.

`total_steps` is what the module derives from the Trainer (optimizer steps for interval=step,
epochs for interval=epoch), so warmup and decay follow gradient accumulation and the number of
devices instead of being hard-coded. `warmup` below 1 is a fraction of total_steps, otherwise
a count.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, StepLR


def _steps(value: float, total_steps: int) -> int:
    return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def _warmup_then(decay, warmup_steps: int, total_steps: int):
    """lr multiplier: linear ramp from 1/(warmup+1) to 1, then decay(progress in [0, 1])."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        return decay(min(1.0, (step - warmup_steps) / span))

    return factor


def cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0, min_lr_ratio: float = 0.0) -> LRScheduler:
    """Cosine annealing to min_lr_ratio * lr, after an optional linear warmup."""
    decay = lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return LambdaLR(optimizer, _warmup_then(decay, _steps(warmup, total_steps), total_steps))


def linear(optimizer: Optimizer, total_steps: int, warmup: float = 0, final_lr_ratio: float = 0.0) -> LRScheduler:
    """Linear decay to final_lr_ratio * lr, after an optional linear warmup (BERT fine-tuning)."""
    decay = lambda p: 1 - (1 - final_lr_ratio) * p
    return LambdaLR(optimizer, _warmup_then(decay, _steps(warmup, total_steps), total_steps))


def warmup(optimizer: Optimizer, total_steps: int, warmup: float = 0.05) -> LRScheduler:
    """Linear warmup, then constant."""
    return LambdaLR(optimizer, _warmup_then(lambda p: 1.0, _steps(warmup, total_steps), total_steps))


def exponential(optimizer: Optimizer, total_steps: int, final_lr_ratio: float = 0.1) -> LRScheduler:
    """Smooth exponential decay reaching final_lr_ratio * lr at the end (the NeRF paper's schedule)."""
    return LambdaLR(optimizer, lambda step: final_lr_ratio ** (min(step, total_steps) / max(1, total_steps)))


def step(optimizer: Optimizer, total_steps: int, step_size: float = 0.3, gamma: float = 0.1) -> LRScheduler:
    """Multiply lr by gamma every step_size steps (a fraction of total_steps when below 1)."""
    return StepLR(optimizer, step_size=max(1, _steps(step_size, total_steps)), gamma=gamma)


def one_cycle(
    optimizer: Optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """torch's OneCycleLR peaking at the optimizer's configured lr."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(2, total_steps), pct_start=pct_start,
        div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=False,
    )
