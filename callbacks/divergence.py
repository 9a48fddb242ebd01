"""Whether a step diverged, judged from what it leaves on the host a step or two late: its loss and the
norm of the weights it started from, each against the median of recent good readings.

The loss alone misses a divergence when the loss is bounded: NeRF's MSE of sigmoid colours stays
below 1 after the very first update at a huge learning rate has wrecked the weights, and the median
it is compared with is then built from diverged losses. The weights cannot hide it: healthy training
moves their total norm slowly, while a diverging update multiplies it. The reference is the median of
recent good norms, not the norm at the last snapshot: that may lie far back, and the median of many
recent steps trails even a steady climb from zero weights by a small factor only. Every parameter
counts, trainable or not, so that freezing or unfreezing layers never changes what is measured.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch


def by_device(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The parameters grouped by device, for `weight_norms` (built once: grouping costs host time)."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.device, []).append(p)
    return list(groups.values())


@torch.no_grad()
def weight_norms(groups: list[list[torch.Tensor]], device: torch.device) -> list[torch.Tensor]:
    """The L2 norm of each parameter, in float32 (a float16 norm overflows at 65504), on `device`: one
    multi-tensor kernel per device, no host sync. The host sums their squares once they are read."""
    norms: list[torch.Tensor] = []
    for group in groups:
        found = torch._foreach_norm(group, 2, dtype=torch.float32)
        norms += found if group[0].device == device else [n.to(device) for n in found]
    return norms


def unpack(values: list[float], has_loss: bool) -> tuple[float, float | None, float | None]:
    """A step's reading read back: (gradient flag, loss or None, global weight norm or None)."""
    loss = values[1] if has_loss else None
    norms = values[1 + has_loss:]
    return values[0], loss, (math.sqrt(sum(n * n for n in norms)) if norms else None)


class DivergenceJudge:
    """Keeps the last `window` good losses and weight norms, with their steps, and judges new ones."""

    def __init__(self, loss_factor: float | None = 100.0, weight_norm_factor: float | None = 10.0,
                 window: int = 100, warmup_steps: int = 0) -> None:
        self.loss_factor = loss_factor or None  # null or 0 turns a check off
        self.weight_norm_factor = weight_norm_factor or None
        self.warmup_steps = warmup_steps  # for the loss only: the weights' norm never needs one
        self.losses: deque[tuple[int, float]] = deque(maxlen=max(1, window))
        self.weight_norms: deque[tuple[int, float]] = deque(maxlen=max(1, window))

    def __call__(self, step: int, loss: float | None, weight_norm: float | None = None) -> str | None:
        """Why this step diverged, or None when it did not."""
        if loss is not None and self.loss_factor is not None:
            if not math.isfinite(loss):
                return f"loss {loss}"
            median = self._median(self.losses)
            if step >= self.warmup_steps and median and loss > self.loss_factor * median:
                return (f"loss {loss:.4g} above {self.loss_factor:g}x the median {median:.4g} "
                        f"of the last {len(self.losses)} good steps")
        if weight_norm is not None and self.weight_norm_factor is not None:
            if not math.isfinite(weight_norm):
                return f"parameter norm {weight_norm}"
            median = self._median(self.weight_norms)
            if median and weight_norm > self.weight_norm_factor * median:
                n = len(self.weight_norms)
                return (f"parameter norm {weight_norm:.3g}, {weight_norm / median:.3g}x the median {median:.4g} "
                        f"of the last {n} good step{'s' if n > 1 else ''} (limit {self.weight_norm_factor:g}x)")
        return None

    def good(self, step: int, loss: float | None, weight_norm: float | None = None) -> None:
        if loss is not None:
            self.losses.append((step, loss))
        if weight_norm is not None:
            self.weight_norms.append((step, weight_norm))

    def forget_after(self, step: int) -> None:
        """After a restore to `step`: the readings of the steps rolled back no longer describe the weights."""
        for readings in (self.losses, self.weight_norms):
            while readings and readings[-1][0] > step:
                readings.pop()

    @staticmethod
    def _median(readings) -> float | None:
        median = statistics.median(v for _, v in readings) if readings else None
        return median if median and median > 0 else None
