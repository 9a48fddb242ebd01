"""Learning-rate schedules as factories `f(optimizer, total_steps, **config)`.

`total_steps` is what the module derives from the Trainer (optimizer steps for interval=step,
epochs for interval=epoch), so warmup and decay follow gradient accumulation and the number of
devices instead of being hard-coded. `warmup` below 1 is a fraction of total_steps, otherwise
a count.

A run resumed with another length (a larger `max_epochs`) goes on from the learning rate it had:
what was left of its schedule is stretched over the steps now left (`Resizable`). Recomputing the
lr for the new length instead made it jump back up: a cosine 90% through 100 epochs is 45% through 200.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, StepLR

log = logging.getLogger(__name__)


def _steps(value: float, total_steps: int) -> int:
    return int(round(value * total_steps)) if 0 < value < 1 else int(value)


def _warmup_then(decay, warmup_steps: int, total_steps: int):
    """lr multiplier: linear ramp from 1/(warmup+1) to 1, then decay(progress in [0, 1])."""

    def factor(step: float) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        return decay(min(1.0, (step - warmup_steps) / span))

    return factor


class Resizable:
    """A schedule that knows the length it was built for. Its own step for the run's step s is
    A + (s - a) * (B - A) / (b - a): steps a..b of this run cover its steps A..B. A fresh run is the
    identity (0, 0, T, T); a resume with another total T' at step s goes on from where it was,
    (s, own step of s, T', B), so the lr is continuous and the schedule still ends with the run."""

    def _size(self, total_steps: int) -> None:
        self.run_total = int(total_steps)
        self.stretch = [0.0, 0.0, float(total_steps), float(total_steps)]  # a, A, b, B

    def own_step(self, step: float) -> float:
        a, own_a, b, own_b = self.stretch
        return own_a + (step - a) * (own_b - own_a) / max(1.0, b - a)

    def _resize(self, total_steps: int) -> None:
        """After a restore: `total_steps` is this run's length, `stretch` the restored run's."""
        a, own_a, b, own_b = self.stretch
        if total_steps != b:
            now = self.last_epoch
            self.stretch = [float(now), self.own_step(now), float(total_steps), own_b]
            if now >= b:
                log.warning("The learning-rate schedule had run its full length (%d steps) before this resume: the "
                            "%d steps added train at its final lr. For a new schedule, start a new run from these "
                            "weights (init_from=<checkpoint>).", int(b), max(0, total_steps - now))
            else:
                log.info("Resumed at step %d of a schedule sized for %d steps; this run has %d: the rest of the "
                         "schedule is stretched over the steps left, from the lr it had.", now, int(b), total_steps)
        self.run_total = int(total_steps)


class ResizableLambdaLR(Resizable, LambdaLR):
    """LambdaLR over `shape(total)(step)`; the factor function stays out of the state (and checkpoints)."""

    def __init__(self, optimizer: Optimizer, shape: Callable[[int], Callable[[float], float]], total_steps: int):
        self._size(total_steps)
        self._shape, self._factor = shape, shape(total_steps)
        super().__init__(optimizer, lambda step: self._factor(self.own_step(step)))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_shape", None)
        state.pop("_factor", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        total = self.run_total
        super().load_state_dict(state_dict)
        if "stretch" not in state_dict:  # saved before schedules knew their length: sized anew, as then
            self._size(total)
        self._resize(total)
        self._factor = self._shape(int(round(self.stretch[3])))


def cosine(optimizer: Optimizer, total_steps: int, warmup: float = 0, min_lr_ratio: float = 0.0) -> LRScheduler:
    """Cosine annealing to min_lr_ratio * lr, after an optional linear warmup."""
    decay = lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return ResizableLambdaLR(optimizer, lambda total: _warmup_then(decay, _steps(warmup, total), total), total_steps)


def linear(optimizer: Optimizer, total_steps: int, warmup: float = 0, final_lr_ratio: float = 0.0) -> LRScheduler:
    """Linear decay to final_lr_ratio * lr, after an optional linear warmup (BERT fine-tuning)."""
    decay = lambda p: 1 - (1 - final_lr_ratio) * p
    return ResizableLambdaLR(optimizer, lambda total: _warmup_then(decay, _steps(warmup, total), total), total_steps)


def warmup(optimizer: Optimizer, total_steps: int, warmup: float = 0.05) -> LRScheduler:
    """Linear warmup, then constant."""
    return ResizableLambdaLR(optimizer, lambda total: _warmup_then(lambda p: 1.0, _steps(warmup, total), total),
                             total_steps)


def exponential(optimizer: Optimizer, total_steps: int, final_lr_ratio: float = 0.1) -> LRScheduler:
    """Smooth exponential decay reaching final_lr_ratio * lr at the end (the NeRF paper's schedule)."""
    shape = lambda total: lambda step: final_lr_ratio ** (min(step, total) / max(1, total))
    return ResizableLambdaLR(optimizer, shape, total_steps)


class ResizableStepLR(Resizable, StepLR):
    """StepLR, in closed form over its own (stretched) steps."""

    def __init__(self, optimizer: Optimizer, total_steps: int, step_size: int, gamma: float) -> None:
        self._size(total_steps)
        super().__init__(optimizer, step_size=step_size, gamma=gamma)

    def get_lr(self) -> list[float]:
        return [base * self.gamma ** (self.own_step(self.last_epoch) // self.step_size) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        total = self.run_total
        super().load_state_dict(state_dict)
        if "stretch" not in state_dict:
            self._size(total)
        self._resize(total)


def step(optimizer: Optimizer, total_steps: int, step_size: float = 0.3, gamma: float = 0.1) -> LRScheduler:
    """Multiply lr by gamma every step_size steps (a fraction of total_steps when below 1)."""
    return ResizableStepLR(optimizer, total_steps, step_size=max(1, _steps(step_size, total_steps)), gamma=gamma)


class ResizableOneCycleLR(Resizable, OneCycleLR):
    """OneCycleLR over its own (stretched) steps, held at the end of its last phase past it (torch's would
    anneal back up, then raise)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, **kwargs) -> None:
        self._size(total_steps)
        super().__init__(optimizer, total_steps=total_steps, **kwargs)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        self.last_epoch = min(self.own_step(step), self._schedule_phases[-1]["end_step"])
        try:
            return super().get_lr()
        finally:
            self.last_epoch = step

    def load_state_dict(self, state_dict: dict) -> None:
        total = self.run_total
        super().load_state_dict(state_dict)
        if "stretch" not in state_dict:  # torch's OneCycleLR state: it knew its length
            self._size(self.total_steps)
        self._resize(total)


def one_cycle(
    optimizer: Optimizer, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """torch's OneCycleLR peaking at the optimizer's configured lr."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return ResizableOneCycleLR(
        optimizer, max(2, total_steps), max_lr=max_lr, pct_start=pct_start,
        div_factor=div_factor, final_div_factor=final_div_factor, cycle_momentum=False,
    )
