"""Training-window augmentation of the clinical task (`data.augment`; off by default, as GlucoBench's
recipes train without it). Only the training loader reads these windows: validation, test and predict
windows are always the data as recorded."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from datamodules.clinical.windows import Batched, WindowDataset

# conf/data/clinical.yaml documents these; a knob at 0 is off
DEFAULTS = {"offset_jitter": 12, "amplitude_scale": 0.05, "noise_std": 2.0}


class AugmentedWindows(Batched):
    """Training windows moved, scaled and noised afresh in every batch, drawn from the global torch RNG
    (loader workers reseed it per batch, so a resumed run draws the same) or, when cut on the windows'
    device (clinical/device_batches.py), from a generator keyed by the chunk of batches cut at once.

    offset_jitter    each window's start moves by up to this many steps either way, within its segment: at
                     least min_context real inputs, its last input and every target usable; a move that
                     would break that leaves the window where it was
    amplitude_scale  the target channel, inputs and targets alike, times a factor in [1 - s, 1 + s] per
                     window: a sensor's calibration gain, so the forecast scales with what it reads
    noise_std        Gaussian noise of this SD, in the target's units, on the observed readings of the input
                     target channel: not on interpolated steps, padding or gap filler, and not on targets
    """

    def __init__(self, dataset: WindowDataset, offset_jitter: int = 0, amplitude_scale: float = 0.0,
                 noise_std: float = 0.0) -> None:
        super().__init__(dataset)
        self.offset_jitter, self.amplitude_scale, self.noise_std = int(offset_jitter), float(amplitude_scale), float(noise_std)
        # on the dataset's device, so batches cut there copy nothing to it
        self.lengths = torch.as_tensor(dataset.offsets, device=dataset.present.device).diff()
        # unusable steps before each position: a window's targets are usable where it does not rise over them
        self.gaps = torch.cat([dataset.present.new_zeros(1, dtype=torch.long), torch.cumsum(~dataset.present, 0)])

    def __getitem__(self, i: int) -> dict:
        return {key: value[0] for key, value in self.__getitems__([i]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict:
        w = torch.as_tensor(self.dataset.windows[np.asarray(indices, dtype=np.int64)])
        return self.cut(w[:, 0], w[:, 1])

    def cut(self, k: torch.Tensor, start: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The windows of segments `k` from `start`, moved, scaled and noised on their device; draws come
        from `generator`, or without one from the global RNG of that device."""
        draw = {"generator": generator, "device": k.device}
        if self.offset_jitter:
            start = self.shift(k, start, generator)
        batch = self.dataset.gather(k, start)  # fresh tensors: changed in place below
        if self.amplitude_scale:
            gain = 1 + self.amplitude_scale * (2 * torch.rand(len(k), **draw) - 1)
            batch["x"][..., 0] *= gain[:, None]
            batch["y"] *= gain[:, None]
        if self.noise_std:
            batch["x"][..., 0] += self.noise_std * torch.randn(batch["observed"].shape, **draw) * batch["observed"]
        return batch

    def shift(self, k: torch.Tensor, start: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Starts moved by up to `offset_jitter` steps, each still a valid training window of its segment."""
        ds = self.dataset
        jitter = torch.randint(-self.offset_jitter, self.offset_jitter + 1, start.shape, generator=generator,
                               device=start.device)
        moved = torch.minimum((start + jitter).clamp_min(ds.min_context - ds.L), self.lengths[k] - ds.L - ds.H)
        at = torch.as_tensor(ds.offsets, device=k.device)[k] + moved
        usable = ds.present[at + ds.L - 1] & (self.gaps[at + ds.L + ds.H] == self.gaps[at + ds.L])
        return torch.where(usable, moved, start)
