"""Recover from non-finite gradients and diverging losses or weights instead of training on garbage.

Every optimizer step the gradients are checked for NaN and inf. A bad step is skipped, counted, and
the parameters with non-finite gradients are logged by name. With a fused optimizer (the suite's
default) the skip happens on the device, through the optimizer's `found_inf` input that GradScaler
also uses, and the flag is read back later through a non-blocking copy, so the check never stalls
the GPU; other optimizers get a synchronous check that drops the step's gradients.

A loss that diverges and stays finite makes a bad step too: a loss above `divergence_factor` times
the median of the last `divergence_window` good losses, or a non-finite loss. The loss travels with
the gradient flag in the same delayed copy. So does the global norm of the weights each step starts
from: a step is bad too when it is above `weight_norm_factor` times the median of the last good ones,
or non-finite, which catches a divergence whose loss stays in range (callbacks/divergence.py). Such
steps are not skipped: a lone spike is normal, and a run of them is undone by the restore.

After `max_consecutive` bad steps in a row the last good state (weights, optimizer, gradient scaler)
is restored and the learning rate multiplied by `lr_factor`; after `max_restores` restores the run
stops with a saved checkpoint and a one-line error. A snapshot is taken only of a state whose own
step read good, after every earlier step was read, so a restore never brings back weights that had
already diverged: on the GPU the flag of a snapshot's step is read at once, one host sync every
`snapshot_every_n_steps`. With 16-mixed precision, inf gradients are the scaler's business (it skips
and rescales), so only the loss and the weights count there.

The check costs one multi-tensor kernel and one flag a step; the loss adds one small kernel that
packs it with the flag, the weights' norm one multi-tensor kernel whose per-parameter norms go into
the same pack. Under FSDP the whole check is skipped. Per-parameter flags, which name the bad
parameters, cost one small tensor per parameter, a real share of a host-bound step (BENCHMARKS.md,
session 10). They are gathered only when the step's flag can be read at once (the CPU, non-fused
optimizers) or while steps are going bad; on the GPU the first bad step of a run of bad steps is
therefore reported without names, and the next ones with them.
"""
from __future__ import annotations

import copy
import logging
from collections import deque
from pathlib import Path

import lightning as L
import torch

from callbacks.divergence import DivergenceJudge, by_device, unpack, weight_norms
from common.host_copy import copy_to_host
from common.parallel import skipped_when_sharded

log = logging.getLogger(__name__)
NONFINITE = "non-finite gradients"
LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


class NonFiniteTrainingError(RuntimeError):
    """Steps kept going bad and restoring the last good state did not help."""


class TrainingDivergedError(NonFiniteTrainingError):
    """The bad steps were a diverging loss (finite or not), not non-finite gradients."""


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


def _packed(trainer, bad: torch.Tensor, loss: torch.Tensor | None, norms: list[torch.Tensor]) -> torch.Tensor:
    """The step's gradient flag, loss and per-parameter weight norms as one tensor, copied to the host at
    once. Under DDP it is averaged over the ranks (the weights are the same on each), on the device, so
    that every rank decides alike and restores together."""
    if loss is None and not norms:
        return bad
    reading = torch.stack([bad, *([] if loss is None else [loss.float().reshape(()).to(bad.device)]), *norms])
    if loss is not None and trainer.world_size > 1 and torch.distributed.is_available() \
            and torch.distributed.is_initialized():
        torch.distributed.all_reduce(reading)
        reading /= trainer.world_size
    return reading


class NaNRecovery(L.Callback):
    def __init__(self, max_consecutive: int = 3, lr_factor: float = 0.5, max_restores: int = 3,
                 snapshot_every_n_steps: int = 100, divergence_factor: float | None = 100.0,
                 divergence_window: int = 100, divergence_warmup_steps: int = 0,
                 weight_norm_factor: float | None = 10.0) -> None:
        self.max_consecutive = max_consecutive
        self.lr_factor = lr_factor
        self.max_restores = max_restores
        self.snapshot_every = max(1, snapshot_every_n_steps)
        self.divergence_factor = divergence_factor or None  # null or 0 turns the loss check off
        self._judge = DivergenceJudge(divergence_factor, weight_norm_factor, divergence_window,
                                      divergence_warmup_steps)
        self._loss: torch.Tensor | None = None  # this step's, summed over its backward passes
        self._pending: deque = deque()
        self._to_log: dict[str, float] = {}  # flags are also read at epoch ends and saves, where logging is refused
        self._module: L.LightningModule | None = None
        self._parameters: list[tuple[str, torch.nn.Parameter]] = []
        self._weights: list[list[torch.nn.Parameter]] = []  # every parameter, by device, for the weight norm
        self.skipped_total = 0
        self.diverged_total = 0
        self.consecutive = 0
        self.restores = 0
        self._streak: dict = {}  # the bad steps in a row: first, last, the first divergence among them
        self._snapshot: dict | None = None
        self._snapshot_copied: torch.cuda.Event | None = None

    # ---- detection ----------------------------------------------------------------------------
    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.divergence_factor is None:
            return
        loss = loss.detach()
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if isinstance(scale, torch.Tensor):  # 16-mixed hands this hook the loss times the gradient scale
            loss = loss.float() / scale
        # Lightning divides each accumulated micro-batch's loss by their number: the sum is the step's mean
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._check(trainer, pl_module, optimizer)
        if self._to_log:
            pl_module.log_dict(self._to_log, on_step=True, on_epoch=False)
            self._to_log = {}

    def _check(self, trainer, pl_module, optimizer) -> None:
        loss, self._loss = self._loss, None
        # a rank sees only its shard of the gradients, and snapshots would hold shards
        if skipped_when_sharded(trainer, "NaN recovery", "It needs whole gradients and weights on each rank."):
            return
        if self._module is not pl_module:  # walking the modules every step costs ~0.4 ms of host time
            self._module, self._parameters = pl_module, list(pl_module.named_parameters())
            weights = [p for _, p in self._parameters] if self._judge.weight_norm_factor else []
            self._weights = by_device(weights)
        named = [(n, p.grad) for n, p in self._parameters if p.grad is not None]
        if not named:
            return
        names, grads = [n for n, _ in named], [g for _, g in named]
        bad = nonfinite_flag(grads)
        reading = _packed(trainer, bad, loss, weight_norms(self._weights, bad.device))
        has_loss = loss is not None
        restores, nonfinite = self.restores, False
        fused = optimizer.defaults.get("fused")
        delayed = fused and _lands_later(bad) and not self._snapshot_due(trainer)
        self._drain(trainer, pl_module, wait=not delayed)  # a snapshot's step is read after all before it
        if self.restores == restores and delayed:  # read the flag when it has landed, a step or two later
            finite = finite_per_tensor(grads) if self.consecutive else None
            copied = copy_to_host((reading, finite))
            self._pending.append((trainer.global_step, names, copied, _recorded_event(bad.device), has_loss))
        elif self.restores == restores:  # readable now: the bad parameters are named only when there are some
            values = unpack(reading.reshape(-1).tolist(), has_loss)
            nonfinite = values[0] > 0
            self._record(trainer, pl_module, values, names, finite_per_tensor(grads) if nonfinite else None)
        # After a restore this step's gradients belong to the weights that were just replaced: skipped too.
        replaced = self.restores != restores
        if fused:  # the fused kernel skips the update when found_inf is set
            optimizer.found_inf = torch.ones_like(bad) if replaced else bad
        elif nonfinite or replaced:  # other optimizers skip parameters without gradients
            for p in pl_module.parameters():
                p.grad = None

    def _drain(self, trainer, pl_module, wait: bool = False) -> None:
        """Account for the steps whose flags have reached the host (all of them when wait=True)."""
        while self._pending:
            step, names, (reading, finite), event, has_loss = self._pending[0]
            if not (wait or event.query()):
                return
            event.synchronize()
            self._pending.popleft()
            values = unpack(reading.reshape(-1).tolist(), has_loss)
            self._record(trainer, pl_module, values, names, finite, step)

    def _record(self, trainer, pl_module, values: tuple, names, finite, step=None) -> None:
        """Account for one step: `values` is its gradient flag, loss and weight norm (see `unpack`)."""
        step = trainer.global_step if step is None else step
        flag, loss, weight_norm = values
        flagged = flag > 0
        nonfinite = flagged and not str(trainer.precision).startswith("16")  # there the scaler skips and rescales
        cause = NONFINITE if nonfinite else self._judge(step, loss, weight_norm)
        if cause is None:
            if not flagged:
                self._good_step(trainer, pl_module, step, loss, weight_norm)
            return
        self.consecutive += 1
        if self.consecutive == 1:
            self._streak = {"first": step, "divergence": None, "then_nonfinite": False}
        self._streak["last"] = step
        if nonfinite:
            self._streak["then_nonfinite"] = self._streak["divergence"] is not None
        elif self._streak["divergence"] is None:  # the cause when gradients go non-finite after it
            self._streak["divergence"] = f"{cause} at step {step}"
        if nonfinite:
            self.skipped_total += 1
            if finite is None:
                where = "not named: on the GPU they are gathered from the next bad step on"
            else:
                bad_names = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
                where = ", ".join(bad_names[:10]) + (f" and {len(bad_names) - 10} more" if len(bad_names) > 10 else "")
            log.warning("Non-finite gradient at step %d, step skipped (%d consecutive, %d in all); parameters: %s",
                        step, self.consecutive, self.skipped_total, where)
            self._to_log["train/nonfinite_steps"] = float(self.skipped_total)
        else:
            self.diverged_total += 1
            log.warning("Diverging %s at step %d: %s (bad step %d in a row, %d diverged in all)",
                        "loss" if cause.startswith("loss") else "weights", step, cause, self.consecutive,
                        self.diverged_total)
            self._to_log["train/diverged_steps"] = float(self.diverged_total)
        if self.consecutive >= self.max_consecutive:
            self._pending.clear()  # steps after the restore point are rolled back with it
            self._restore(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._drain(trainer, pl_module, wait=True)

    def _snapshot_due(self, trainer) -> bool:
        # A snapshot of step 0 precedes the optimizer's first step and holds none of its state: it is
        # retaken at the next good step, so the buffers for that state are allocated there, not mid-run.
        snap = self._snapshot
        return snap is None or snap["step"] == 0 or trainer.global_step - snap["step"] >= self.snapshot_every

    def _good_step(self, trainer, pl_module, step: int | None = None, loss: float | None = None,
                   weight_norm: float | None = None) -> None:
        self.consecutive = 0
        self._judge.good(trainer.global_step if step is None else step, loss, weight_norm)
        # Only the state of the step just read good is kept: a later one may already have diverged.
        if step in (None, trainer.global_step) and self._snapshot_due(trainer):
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
            self._stop(trainer)
        snap = self._snapshot
        if self._snapshot_copied is not None:
            self._snapshot_copied.synchronize()
        pl_module.load_state_dict(snap["model"])
        for opt, state in zip(trainer.optimizers, snap["optimizers"], strict=True):
            # the live learning rates are kept and lowered: restored ones would undo earlier restores
            live = [{k: g[k] for k in LR_KEYS if k in g} for g in opt.param_groups]
            # a copy: on the CPU the optimizer would adopt these tensors, and the next snapshot,
            # written into the same buffers, would then change the live optimizer state
            opt.load_state_dict(copy.deepcopy(state))
            for group, lrs in zip(opt.param_groups, live, strict=True):
                group.update(lrs)
        if snap["precision"]:
            trainer.precision_plugin.load_state_dict(snap["precision"])
        self._lower_lr(trainer)
        self._judge.forget_after(snap["step"])  # judge what follows against the restored state's past
        self.restores += 1
        self.consecutive = 0
        log.warning("Restored the state of step %d and multiplied the learning rate by %s (restore %d of %d).",
                    snap["step"], self.lr_factor, self.restores, self.max_restores)
        self._to_log["train/nan_restores"] = float(self.restores)

    def _stop(self, trainer) -> None:
        """Save the state and raise one line: what went bad, from which step, and what was tried."""
        streak = self._streak
        diverged = streak["divergence"] is not None
        name = "diverged-stop.ckpt" if diverged else "nonfinite-stop.ckpt"
        path = Path(trainer.default_root_dir) / "checkpoints" / name
        trainer.save_checkpoint(path)
        then = f", then {NONFINITE}" if streak["then_nonfinite"] else ""
        what = f"diverged: {streak['divergence']}{then}" if diverged else f"kept producing {NONFINITE}"
        if self._snapshot is None:
            tried = "with no good state to restore: no step had read good yet"
        elif self.restores == 0:
            tried = "with restores turned off (max_restores=0)"
        else:
            tried = (f"after {self.restores} restores of the last good state "
                     f"(lr multiplied by {self.lr_factor} each time)")
        raise (TrainingDivergedError if diverged else NonFiniteTrainingError)(
            f"Training {what}; {self.consecutive} bad steps in a row from step {streak['first']} to step "
            f"{streak['last']}, {tried}. "
            f"State saved to {path}. Try a lower optimizer.lr, gradient clipping"
            + (" or a smaller lr_factor" if diverged else ", or precision=32-true")
        )

    def _lower_lr(self, trainer) -> None:
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for key in LR_KEYS:
                    if key in group:
                        group[key] *= self.lr_factor
        for config in trainer.lr_scheduler_configs:  # schedules recompute lr from base_lrs: lower those too
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.lr_factor for lr in config.scheduler.base_lrs]

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total, "diverged_total": self.diverged_total, "restores": self.restores}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Lightning took state_dict() before this hook: store the counts again with every flag read
        self._drain(trainer, pl_module, wait=True)
        checkpoint.get("callbacks", {})[self.state_key] = self.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_total = state_dict.get("skipped_total", 0)
        self.restores = state_dict.get("restores", 0)
        self.diverged_total = state_dict.get("diverged_total", 0)
