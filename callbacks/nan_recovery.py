"""Recover from non-finite losses and gradients instead of training on garbage.

Every optimizer step the gradients are checked for NaN and inf. A bad step is skipped, counted, and
the parameters with non-finite gradients are logged by name. With a fused optimizer (the suite's
default) the skip happens on the device, through the optimizer's `found_inf` input that GradScaler
also uses, and the flag is read back later through a non-blocking copy, so the check never stalls
the GPU; other optimizers get a synchronous check that drops the step's gradients. After
`max_consecutive` bad steps the last good state (weights, optimizer, gradient scaler) is restored and
the learning rate multiplied by `lr_factor`; after `max_restores` restores the run stops with a saved
checkpoint and an error. With 16-mixed precision, inf gradients are the scaler's business (it skips
and rescales), so only NaN losses count there.

The check costs one multi-tensor kernel and one flag a step (~0.1 ms of host time). Per-parameter
flags, which name the bad parameters, cost one small tensor per parameter: 1.3-1.9 ms of host time
for MiniLM's 103 on the H100 hosts measured, 5-8% of its host-bound step. They are gathered only
when the step's flag can be read at once (the CPU, non-fused optimizers) or while steps are going
bad; on the GPU the first bad step of a run of bad steps is therefore reported without names, and
the next ones with them.
"""
from __future__ import annotations

import copy
import logging
from collections import deque
from pathlib import Path

import lightning as L
import torch

from suite.checkpoint import copy_to_host
from suite.strategies import skipped_when_sharded

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    pass


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 when any gradient holds a NaN or inf, else 0.0: one device tensor, no host sync. It is the
    kernel GradScaler uses, unscaling by 1 (which leaves every value as it is)."""
    devices = {g.device for g in grads}
    flags = []
    for device in devices:
        found, one = torch.zeros((), device=device), torch.ones((), device=device)
        on_device = grads if len(devices) == 1 else [g for g in grads if g.device == device]
        torch._amp_foreach_non_finite_check_and_unscale_(on_device, found, one)
        flags.append(found)
    return flags[0] if len(flags) == 1 else torch.stack([f.to(grads[0].device) for f in flags]).amax()


def finite_per_tensor(grads: list[torch.Tensor]) -> torch.Tensor:
    """Whether each gradient is all finite, as one bool tensor (no host sync)."""
    norms = torch._foreach_norm(grads) if grads[0].is_cuda else [torch.linalg.vector_norm(g) for g in grads]
    return torch.isfinite(torch.stack([n.float() for n in norms]))


def _lands_later(flag: torch.Tensor) -> bool:
    """Whether reading `flag` on the host would wait for the device (then it is copied and read later)."""
    return flag.is_cuda


def _recorded_event(device: torch.device):
    """An event marking the work queued so far on the current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class NaNRecovery(L.Callback):
    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_restores: int = 3,
                 snapshot_every_n_steps: int = 100) -> None:
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.max_restores = max_restores
        self.snapshot_every = max(1, snapshot_every_n_steps)
        self._pending: deque = deque()
        self._to_log: dict[str, float] = {}  # flags are also read at epoch ends and saves, where logging is refused
        self._module: L.LightningModule | None = None
        self._parameters: list[tuple[str, torch.nn.Parameter]] = []
        self.skipped_total = 0
        self.consecutive = 0
        self.restores = 0
        self._snapshot: dict | None = None
        self._snapshot_copied: torch.cuda.Event | None = None

    # ---- detection ----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._check(trainer, pl_module, optimizer)
        if self._to_log:
            pl_module.log_dict(self._to_log, on_step=True, on_epoch=False)
            self._to_log = {}

    def _check(self, trainer, pl_module, optimizer) -> None:
        # a rank sees only its shard of the gradients, and snapshots would hold shards
        if skipped_when_sharded(trainer, "NaN recovery", "It needs whole gradients and weights on each rank."):
            return
        if self._module is not pl_module:  # walking the modules every step costs ~0.4 ms of host time
            self._module, self._parameters = pl_module, list(pl_module.named_parameters())
        named = [(n, p.grad) for n, p in self._parameters if p.grad is not None]
        if not named:
            return
        names, grads = [n for n, _ in named], [g for _, g in named]
        bad = nonfinite_flag(grads)
        restores = self.restores
        self._drain(trainer, pl_module)
        fused = optimizer.defaults.get("fused")
        if fused:
            # The fused kernel skips the update when found_inf is set; after a restore this step's
            # gradients belong to the weights that were just replaced, so it is skipped too.
            optimizer.found_inf = torch.ones_like(bad) if self.restores != restores else bad
        if fused and _lands_later(bad):  # read the flag when it has landed, a step or two later
            finite = finite_per_tensor(grads) if self.consecutive else None
            self._pending.append((trainer.global_step, names, copy_to_host((bad, finite)), _recorded_event(bad.device)))
            return
        bad = bool(bad)  # readable now: the bad parameters are named only when there are some
        if not fused and (bad or self.restores != restores):  # other optimizers skip parameters without gradients
            for p in pl_module.parameters():
                p.grad = None
        self._record(trainer, pl_module, bad, names, finite_per_tensor(grads) if bad else None)

    def _drain(self, trainer, pl_module, wait: bool = False) -> None:
        """Account for the steps whose flags have reached the host (all of them when wait=True)."""
        while self._pending:
            step, names, (bad, finite), event = self._pending[0]
            if not (wait or event.query()):
                return
            event.synchronize()
            self._pending.popleft()
            self._record(trainer, pl_module, bool(bad), names, finite, step)

    def _record(self, trainer, pl_module, bad: bool, names, finite, step=None) -> None:
        step = trainer.global_step if step is None else step
        if not bad:
            self._good_step(trainer, pl_module)
            return
        if str(trainer.precision).startswith("16"):
            return  # the gradient scaler skips such steps and lowers its scale by itself
        self.skipped_total += 1
        self.consecutive += 1
        if finite is None:
            where = "not named: on the GPU they are gathered from the next bad step on"
        else:
            bad_names = [n for n, ok in zip(names, finite.tolist()) if not ok]
            where = ", ".join(bad_names[:10]) + (f" and {len(bad_names) - 10} more" if len(bad_names) > 10 else "")
        log.warning("Non-finite gradient at step %d, step skipped (%d consecutive, %d in all); parameters: %s",
                    step, self.consecutive, self.skipped_total, where)
        self._to_log["train/nonfinite_steps"] = float(self.skipped_total)
        if self.consecutive >= self.max_consecutive:
            self._pending.clear()  # steps after the restore point are rolled back with it
            self._restore(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def _good_step(self, trainer, pl_module) -> None:
        self.consecutive = 0
        # A snapshot of step 0 precedes the optimizer's first step and holds none of its state: it is
        # retaken at the next good step, so the buffers for that state are allocated there, not mid-run.
        if (self._snapshot is None or self._snapshot["step"] == 0
                or trainer.global_step - self._snapshot["step"] >= self.snapshot_every):
            # Non-blocking copies into the previous snapshot's pinned buffers: a blocking copy of the
            # weights and optimizer state cost legal_bert's MiniLM ~210 ms every 100 steps on an H100.
            # Stream order makes the copy read this step's state before the optimizer changes it.
            state = {"model": pl_module.state_dict(), "optimizers": [o.state_dict() for o in trainer.optimizers],
                     "precision": trainer.precision_plugin.state_dict()}
            self._snapshot = {"step": trainer.global_step, **copy_to_host(state, self._snapshot)}
            self._snapshot_copied = _recorded_event(pl_module.device)

    # ---- recovery -----------------------------------------------------------------------------
    def _restore(self, trainer, pl_module) -> None:
        if self.restores >= self.max_restores or self._snapshot is None:
            path = Path(trainer.default_root_dir) / "checkpoints" / "nonfinite-stop.ckpt"
            trainer.save_checkpoint(path)
            raise NonFiniteTrainingError(
                f"Training kept producing non-finite gradients: {self.consecutive} consecutive bad steps at step "
                f"{trainer.global_step} after {self.restores} restores (lr lowered by {self.lr_factor} each time). "
                f"State saved to {path}. Try a lower optimizer.lr, gradient clipping, or precision=32-true."
            )
        snap = self._snapshot
        if self._snapshot_copied is not None:
            self._snapshot_copied.synchronize()
        pl_module.load_state_dict(snap["model"])
        for opt, state in zip(trainer.optimizers, snap["optimizers"]):
            # a copy: on the CPU the optimizer would adopt these tensors, and the next snapshot,
            # written into the same buffers, would then change the live optimizer state
            opt.load_state_dict(copy.deepcopy(state))
        if snap["precision"]:
            trainer.precision_plugin.load_state_dict(snap["precision"])
        self._lower_lr(trainer)
        self.restores += 1
        self.consecutive = 0
        log.warning("Restored the state of step %d and multiplied the learning rate by %s (restore %d of %d).",
                    snap["step"], self.lr_factor, self.restores, self.max_restores)
        self._to_log["train/nan_restores"] = float(self.restores)

    def _lower_lr(self, trainer) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                    if key in group:
                        group[key] *= self.lr_factor
        for config in trainer.lr_scheduler_configs:  # schedules recompute lr from base_lrs: lower those too
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.lr_factor for lr in config.scheduler.base_lrs]

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "restores": self.restores}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning took state_dict() before this hook: store the counts again with every flag read
        self._drain(trainer, pl_module, wait=True)
        checkpoint.get("callbacks", {})[self.state_key] = self.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.restores = state_dict.get("restores", 0)
