"""Recover from non-finite losses and gradients instead of training on garbage.

Every optimizer step the gradient norm is checked. A bad step is skipped, counted, and the
parameters with non-finite gradients are logged by name. With a fused optimizer (the suite's
default) the skip happens on the device, through the optimizer's `found_inf` input that
GradScaler also uses, and the flags are read back later through non-blocking copies, so the check
never stalls the GPU; other optimizers get a synchronous check that drops the step's gradients. After `max_consecutive` bad steps the
last good state (weights, optimizer, gradient scaler) is restored and the learning rate multiplied
by `lr_factor`; after `max_restores` restores the run stops with a saved checkpoint and an error.
With 16-mixed precision, inf gradients are the scaler's business (it skips and rescales), so only
NaN losses count there.
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


def per_tensor_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each gradient, as one device tensor (no host sync)."""
    norms = torch._foreach_norm(grads) if grads[0].is_cuda else [torch.linalg.vector_norm(g) for g in grads]
    return torch.stack([n.float() for n in norms])


def step_grad_norms(trainer, pl_module) -> tuple[list[str], torch.Tensor] | None:
    """(names, per-parameter gradient norms) of the parameters with gradients at this optimizer step.
    Computed once per step and shared: NaN recovery and the monitor both read it."""
    cached = pl_module.__dict__.get("_step_grad_norms")
    if cached is not None and cached[0] == trainer.global_step:
        return cached[1], cached[2]
    named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
    if not named:
        return None
    names, norms = [n for n, _ in named], per_tensor_norms([g for _, g in named])
    pl_module.__dict__["_step_grad_norms"] = (trainer.global_step, names, norms)
    return names, norms


def _recorded_event(device: torch.device):
    """An event marking the work queued so far on the current stream (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _to_host(flags: torch.Tensor):
    """A non-blocking copy to the host and the event that says when it has landed."""
    return copy_to_host(flags), _recorded_event(flags.device)


class NaNRecovery(L.Callback):
    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_restores: int = 3,
                 snapshot_every_n_steps: int = 100) -> None:
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.max_restores = max_restores
        self.snapshot_every = max(1, snapshot_every_n_steps)
        self._pending: deque = deque()
        self.skipped_total = 0
        self.consecutive = 0
        self.restores = 0
        self._snapshot: dict | None = None
        self._snapshot_copied: torch.cuda.Event | None = None

    # ---- detection ----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # a rank sees only its shard of the gradients, and snapshots would hold shards
        if skipped_when_sharded(trainer, "NaN recovery", "It needs whole gradients and weights on each rank."):
            return
        norms = step_grad_norms(trainer, pl_module)
        if norms is None:
            return
        names, per_param = norms
        finite = torch.isfinite(per_param)
        restores = self.restores
        self._drain(trainer, pl_module)
        if optimizer.defaults.get("fused"):
            # The fused kernel skips the update when found_inf is set; after a restore this step's
            # gradients belong to the weights that were just replaced, so it is skipped too.
            skip = torch.ones((), device=finite.device) if self.restores != restores else (~finite.all()).float()
            optimizer.found_inf = skip
            self._pending.append((trainer.global_step, names, _to_host(finite)))
            self._drain(trainer, pl_module)  # on CPU the flags are ready at once
            return
        if not bool(finite.all()):  # synchronous fallback: optimizers skip parameters without gradients
            for p in pl_module.parameters():
                p.grad = None
        self._record(trainer, pl_module, names, finite.cpu())

    def _drain(self, trainer, pl_module, wait: bool = False) -> None:
        """Account for the steps whose flags have reached the host (all of them when wait=True)."""
        while self._pending:
            step, names, (flags, event) = self._pending[0]
            if event is not None and not (wait or event.query()):
                return
            if event is not None:
                event.synchronize()
            self._pending.popleft()
            self._record(trainer, pl_module, names, flags, step)

    def _record(self, trainer, pl_module, names, flags, step=None) -> None:
        step = trainer.global_step if step is None else step
        if bool(flags.all()):
            self._good_step(trainer, pl_module)
            return
        if str(trainer.precision).startswith("16"):
            return  # the gradient scaler skips such steps and lowers its scale by itself
        bad = [n for n, ok in zip(names, flags.tolist()) if not ok]
        self.skipped_total += 1
        self.consecutive += 1
        log.warning("Non-finite gradient at step %d, step skipped (%d consecutive, %d in all); parameters: %s",
                    step, self.consecutive, self.skipped_total,
                    ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        pl_module.log("train/nonfinite_steps", float(self.skipped_total), on_step=True, on_epoch=False)
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
        pl_module.log("train/nan_restores", float(self.restores), on_step=True, on_epoch=False)

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
        self._drain(trainer, pl_module, wait=True)

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.restores = state_dict.get("restores", 0)
