"""Fixed-length forecasting windows over gap-aware segments."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from datamodules.clinical.records import Segment


def collate(batch):
    """Pass through a batch that `Batched.__getitems__` already assembled; collate a list of items."""
    if isinstance(batch, dict):
        return batch
    return default_collate(batch)


class Batched(Dataset):
    """A view of a WindowDataset whose DataLoader fetches each batch at once (with `collate`)."""

    def __init__(self, dataset: WindowDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[i]

    def __getitems__(self, indices: Sequence[int]) -> dict | list:
        return self.dataset.batch(indices)

    def cut(self, k: torch.Tensor, start: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The training batch of windows of segments `k` from `start`: here as recorded (`generator` is for
        subclasses that draw, such as AugmentedWindows)."""
        return self.dataset.gather(k, start)


class WindowDataset(Dataset):
    """Windows of `sequence_length` inputs followed by `prediction_horizon` targets.

    Each item is a dict of tensors in the data's own units (scaling is the model's job, so a
    checkpoint carries it):
      x        [L, C]  target then covariates; 0 where `present` is false
      observed [L]     a real reading (not interpolated, not filler, not padding)
      present  [L]     a usable value (observed or interpolated); false on padding and long-gap filler
      minute   [L]     minute of the day of each input step (for time-of-day features)
      y        [H]     the target's next H values (NaN past the end of a series, predict only)
    With `with_meta`, also `subject` (str) and `origin` (int64 ns, time of the last input).

    A window may start before its segment (left padding) when `min_context` < L: at least
    `min_context` real input steps are required. Training and evaluation windows need every
    target step usable; prediction windows (`allow_open_end`) may run past the series' end.
    """

    def __init__(self, segments: Sequence[Segment], sequence_length: int, prediction_horizon: int,
                 stride: int = 1, min_context: int | None = None, allow_open_end: bool = False,
                 with_meta: bool = False) -> None:
        if sequence_length < 1 or prediction_horizon < 1 or stride < 1:
            raise ValueError("sequence_length, prediction_horizon and stride must be >= 1, got "
                             f"{sequence_length}, {prediction_horizon}, {stride}")
        self.segments = list(segments)
        self.L, self.H = int(sequence_length), int(prediction_horizon)
        self.min_context = int(min_context or sequence_length)
        if not 1 <= self.min_context <= self.L:
            raise ValueError(f"min_context_length must be in [1, sequence_length={self.L}], got {self.min_context}")
        self.with_meta = with_meta
        self.channels = self.segments[0].values.shape[1] if self.segments else 1
        lengths = np.array([len(s) for s in self.segments], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        cat = (lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt))
        self.values = torch.from_numpy(cat([s.values for s in self.segments], (0, self.channels), np.float32))
        self.observed = torch.from_numpy(cat([s.observed & s.valid for s in self.segments], (0,), bool))
        self.present = torch.from_numpy(cat([s.valid for s in self.segments], (0,), bool))
        self.minute = torch.from_numpy(cat([s.minute_of_day() for s in self.segments], (0,), np.float32))
        self.step_minutes = torch.tensor([s.interval.total_seconds() / 60 for s in self.segments], dtype=torch.float32)
        windows = []
        valid_all = self.present.numpy()
        for k, seg in enumerate(self.segments):
            n = len(seg)
            first = self.min_context - self.L  # input may start this far before the segment
            last = n - self.L if allow_open_end else n - self.L - self.H
            starts = np.arange(first, last + 1, stride, dtype=np.int64)
            if allow_open_end and starts.size and starts[-1] != last:
                starts = np.append(starts, last)  # always forecast from the latest context
            if not starts.size:
                continue
            v = valid_all[self.offsets[k]:self.offsets[k + 1]]
            ok = v[starts + self.L - 1]  # the last input is a usable value
            if not allow_open_end:
                cs = np.concatenate([[0], np.cumsum(~v)])
                ok &= (cs[starts + self.L + self.H] - cs[starts + self.L]) == 0
            starts = starts[ok]
            windows.append(np.stack([np.full(starts.size, k), starts], 1))
        self.windows = np.concatenate(windows) if windows else np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def subjects(self) -> list[str]:
        return sorted({s.subject for s in self.segments})

    def __getitem__(self, i: int) -> dict:
        k, start = (int(v) for v in self.windows[i])
        base, n = int(self.offsets[k]), len(self.segments[k])
        L, H = self.L, self.H
        lo = max(start, 0)
        pad = lo - start
        x = torch.zeros(L, self.channels)
        observed = torch.zeros(L, dtype=torch.bool)
        present = torch.zeros(L, dtype=torch.bool)
        minute = torch.zeros(L)
        sl = slice(base + lo, base + start + L)
        x[pad:] = self.values[sl]
        observed[pad:] = self.observed[sl]
        present[pad:] = self.present[sl]
        minute[pad:] = self.minute[sl]
        if pad:  # time of day keeps running backwards into the padding
            step = self.segments[k].interval.total_seconds() / 60
            minute[:pad] = (minute[pad] - step * torch.arange(pad, 0, -1)) % 1440
        end = min(start + L + H, n)
        y = torch.full((H,), float("nan"))
        y[: end - start - L] = self.values[base + start + L: base + end, 0]
        item = {"x": x, "observed": observed, "present": present, "minute": minute, "y": y}
        if self.with_meta:
            seg = self.segments[k]
            item["subject"] = seg.subject
            item["origin"] = (seg.start + seg.interval * (start + L - 1)).value
        return item

    def batch(self, indices: Sequence[int]) -> dict | list:
        """A whole batch by one gather per field, the same as collating the items one by one."""
        if self.with_meta:
            return [self[int(i)] for i in indices]
        w = torch.as_tensor(self.windows[np.asarray(indices, dtype=np.int64)])
        return self.gather(w[:, 0], w[:, 1])

    def to(self, device: torch.device | str) -> WindowDataset:
        """A copy whose flat tensors, offsets and windows table live on `device`, for `gather` to cut batches
        there; the segments stay as they are."""
        moved = copy.copy(self)
        for name in ("values", "observed", "present", "minute", "step_minutes"):
            setattr(moved, name, getattr(self, name).to(device))
        moved.offsets = torch.as_tensor(self.offsets).to(device)
        moved.windows = torch.as_tensor(self.windows).to(device)
        return moved

    def gather(self, k: torch.Tensor, start: torch.Tensor) -> dict:
        """The windows of segments `k` whose inputs begin at `start` (negative: left padding), batched, on
        the device of `k` (the dataset's tensors must be there: see `to`)."""
        device = k.device
        base = torch.as_tensor(self.offsets, device=device)[k]
        pos = start[:, None] + torch.arange(self.L, device=device)  # [B, L] position within the segment
        real = pos >= 0
        idx = (base[:, None] + pos.clamp_min(0)).view(-1)
        x = self.values[idx].view(len(k), self.L, self.channels) * real[..., None]
        observed = self.observed[idx].view(len(k), self.L) & real
        present = self.present[idx].view(len(k), self.L) & real
        minute = self.minute[idx].view(len(k), self.L)
        # padded steps or not, always: asking whether a batch has any would wait for the GPU
        first = minute.gather(1, (-start).clamp(0, self.L - 1)[:, None])  # minute of the first real step
        back = (first + self.step_minutes[k][:, None] * pos) % 1440
        minute = torch.where(real, minute, back)
        tidx = (base[:, None] + start[:, None] + self.L + torch.arange(self.H, device=device)).view(-1)
        y = self.values[tidx, 0].view(len(k), self.H)
        return {"x": x, "observed": observed, "present": present, "minute": minute, "y": y}

    def arrays(self, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Target-channel inputs, their `present` mask and the targets of up to `limit` windows."""
        idx = np.arange(len(self))
        if limit is not None and len(idx) > limit:
            idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
        items = [self[int(i)] for i in idx]
        if not items:
            return torch.zeros(0, self.L), torch.zeros(0, self.L, dtype=torch.bool), torch.zeros(0, self.H)
        return (torch.stack([it["x"][:, 0] for it in items]), torch.stack([it["present"] for it in items]),
                torch.stack([it["y"] for it in items]))
