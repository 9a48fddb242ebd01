"""Exponential moving average of a model's weights, swapped in for validation, test and predict.

After every optimizer step: ema <- d * ema + (1 - d) * w, with

    d_n = clamp(1 - (1 + n / inv_gamma) ** -power, min_decay, decay)   (warmup=true)
    d_n = decay                                                      (warmup=false)

where n counts EMA updates so far (diffusers' EMAModel warmup: power 2/3 reaches 0.999 after
~31k updates, 0.9999 after ~1M; power 3/4 is faster). The EMA lives in this callback's
state_dict, so it is saved in every checkpoint and restored on resume; when a checkpoint is
evaluated (validate/test/predict with ckpt_path, or the test after fit on the best checkpoint),
its EMA weights are read from that checkpoint.

Not diffusers' EMAModel: it averages in the weights' dtype (bf16 loses 1e-4 steps), by index, no fixed decay.
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from common.parallel import shards_parameters

log = logging.getLogger(__name__)


def ema_decay(num_updates: int, decay: float, warmup: bool = True, power: float = 2 / 3,
              inv_gamma: float = 1.0, min_decay: float = 0.0) -> float:
    """The decay used for update number `num_updates` (0-based)."""
    if not warmup:
        return decay
    value = 1.0 - (1.0 + num_updates / inv_gamma) ** -power
    return max(min_decay, min(decay, value))


class EMA(L.Callback):
    def __init__(self, decay: float = 0.9999, warmup: bool = True, power: float = 2 / 3, inv_gamma: float = 1.0,
                 min_decay: float = 0.0, update_every: int = 1, start_step: int = 0,
                 use_for_eval: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.power, self.inv_gamma, self.min_decay = decay, warmup, power, inv_gamma, min_decay
        self.update_every = max(1, int(update_every))
        self.start_step = int(start_step)
        self.use_for_eval = use_for_eval
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] | None = None
        self._backup: list[torch.Tensor] | None = None
        self._last_step = -1
        self._pairs = None

    @property
    def state_key(self) -> str:
        return "EMA"  # stable, so a checkpoint's EMA is found whatever decay this run uses

    # ---- the average -----------------------------------------------------------------------------
    @staticmethod
    def _params(pl_module) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]

    def _init(self, pl_module) -> None:
        self._pairs = None
        self.shadow = {n: p.detach().clone().float() for n, p in self._params(pl_module)}

    def _to_device(self, pl_module) -> None:
        if self.shadow is None:
            return
        params = dict(self._params(pl_module))
        missing = set(params) - set(self.shadow)
        if missing:
            raise ValueError(f"The EMA state does not match the model: missing {sorted(missing)[:3]}")
        for n, p in params.items():
            if self.shadow[n].device != p.device:
                self.shadow[n] = self.shadow[n].to(p.device)
                self._pairs = None

    @torch.no_grad()
    def update(self, pl_module) -> float:
        """One EMA step from the module's current weights; returns the decay used."""
        if self.shadow is None:
            self._init(pl_module)
        d = ema_decay(self.num_updates, self.decay, self.warmup, self.power, self.inv_gamma, self.min_decay)
        if self._pairs is None or self._pairs[2] is not pl_module:  # cached: no per-step name lookups
            params = self._params(pl_module)
            self._pairs = ([self.shadow[n] for n, _ in params], [p for _, p in params], pl_module)
        ema, params, _ = self._pairs
        # fp32 weights are read as they are (no_grad); only other dtypes need a float copy
        current = params if all(p.dtype == torch.float32 for p in params) else [p.float() for p in params]
        torch._foreach_lerp_(ema, current, 1.0 - d)
        self.num_updates += 1
        return d

    # ---- training --------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if shards_parameters(trainer):
            raise ValueError("The EMA callback averages whole weights, which no rank holds under trainer=fsdp or "
                             "trainer=pipeline. Run with callbacks.ema=null, or use trainer=ddp to keep the EMA.")
        if self.shadow is None:
            self._init(pl_module)
        self._to_device(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = step
        if step < self.start_step:
            self._init(pl_module)  # follow the weights exactly until averaging starts
            return
        if step % self.update_every == 0:
            self.update(pl_module)

    # ---- evaluation with the average -------------------------------------------------------------
    def _load_from_checkpoint(self, trainer) -> None:
        path = trainer.ckpt_path
        if not path:
            return
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if state is None:
            log.warning("%s has no EMA weights; evaluating its raw weights.", path)
            self.shadow = None
            return
        self.load_state_dict(state)

    def _swap_in(self, trainer, pl_module) -> None:
        if not self.use_for_eval:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            self._load_from_checkpoint(trainer)
        if self.shadow is None:
            return
        self._to_device(pl_module)
        params = [p for _, p in self._params(pl_module)]
        self._backup = [p.detach().clone() for p in params]
        with torch.no_grad():
            for (n, p) in self._params(pl_module):
                p.copy_(self.shadow[n])

    def _swap_out(self, pl_module) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for p, saved in zip([p for _, p in self._params(pl_module)], self._backup, strict=True):
                p.copy_(saved)
        self._backup = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._swap_in(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap_out(pl_module)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        shadow = None if self.shadow is None else {n: t.detach().cpu() for n, t in self.shadow.items()}
        # the last step it averaged: a run resumed inside an accumulation window must not average that step again
        return {"num_updates": self.num_updates, "decay": self.decay, "shadow": shadow, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._pairs = None
        shadow = state_dict.get("shadow")
        self.shadow = None if shadow is None else {n: t.float().clone() for n, t in shadow.items()}
