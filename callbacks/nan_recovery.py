"""Recover from non-finite losses and gradients instead of training on garbage.

Every optimizer step the gradient norm is checked (one small device-to-host read). A bad step is
skipped (its gradients dropped, so the optimizer leaves weights and moments alone), counted, and
the parameters with non-finite gradients are logged by name. After `max_consecutive` bad steps the
last good state (weights, optimizer, gradient scaler) is restored and the learning rate multiplied
by `lr_factor`; after `max_restores` restores the run stops with a saved checkpoint and an error.
With 16-mixed precision, inf gradients are the scaler's business (it skips and rescales), so only
NaN losses count there.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    pass


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of a list of gradients, as one device tensor (no host sync)."""
    norms = torch._foreach_norm(grads) if grads[0].is_cuda else [torch.linalg.vector_norm(g) for g in grads]
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def _to_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(v) for v in state)
    return copy.deepcopy(state)


class NaNRecovery(L.Callback):
    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_restores: int = 3,
                 snapshot_every_n_steps: int = 100) -> None:
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.max_restores = max_restores
        self.snapshot_every = max(1, snapshot_every_n_steps)
        self.skipped_total = 0
        self.consecutive = 0
        self.restores = 0
        self._snapshot: dict | None = None

    # ---- detection ----------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        if torch.isfinite(total_norm(grads)).item():
            self._good_step(trainer, pl_module)
            return
        if str(trainer.precision).startswith("16"):
            return  # the gradient scaler skips this step and lowers its scale by itself
        bad = [n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        for p in pl_module.parameters():
            p.grad = None  # optimizers skip parameters without gradients: this step changes nothing
        self.skipped_total += 1
        self.consecutive += 1
        log.warning("Non-finite gradient at step %d (%d consecutive, %d skipped in all); parameters: %s",
                    trainer.global_step, self.consecutive, self.skipped_total, ", ".join(bad[:10]) +
                    (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        pl_module.log("train/nonfinite_steps", float(self.skipped_total), on_step=True, on_epoch=False)
        if self.consecutive >= self.max_consecutive:
            self._restore(trainer, pl_module, optimizer)

    def _good_step(self, trainer, pl_module) -> None:
        self.consecutive = 0
        if self._snapshot is None or trainer.global_step % self.snapshot_every == 0:
            self._snapshot = {
                "step": trainer.global_step,
                "model": _to_cpu(pl_module.state_dict()),
                "optimizers": [_to_cpu(o.state_dict()) for o in trainer.optimizers],
                "precision": _to_cpu(trainer.precision_plugin.state_dict()),
            }

    # ---- recovery -----------------------------------------------------------------------------
    def _restore(self, trainer, pl_module, optimizer) -> None:
        if self.restores >= self.max_restores or self._snapshot is None:
            path = Path(trainer.default_root_dir) / "checkpoints" / "nonfinite-stop.ckpt"
            trainer.save_checkpoint(path)
            raise NonFiniteTrainingError(
                f"Training kept producing non-finite gradients: {self.consecutive} consecutive bad steps at step "
                f"{trainer.global_step} after {self.restores} restores (lr lowered by {self.lr_factor} each time). "
                f"State saved to {path}. Try a lower optimizer.lr, gradient clipping, or precision=32-true."
            )
        snap = self._snapshot
        pl_module.load_state_dict(snap["model"])
        for opt, state in zip(trainer.optimizers, snap["optimizers"]):
            opt.load_state_dict(state)
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

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.restores = state_dict.get("restores", 0)
