"""The LightningModule every task derives from.

It owns what every task does the same way: building the optimizer from a `_partial_` config
with no weight decay on biases and norm weights, building the learning-rate schedule from the
Trainer's real number of steps, logging the learning rate, and carrying the run's config in
each checkpoint. A task implements its network, `training_step` and `validation_step`; what it
learns from its data arrives in `bind_data` (common/task_data.py), called from `setup`. The fast
path's per-task answers (`compile_plan`, `convolutional`, `attention_kernel`) are read by the suite
and common/fast_path.py; setup turns model.compile into `compile_decision` and prints it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch

from common.fast_path import (
    CUDA_GRAPH_MODES,
    CompileDecision,
    CompilePlan,
    resolve_compile,
    use_compile_cache,
)
from common.parallel import shards_parameters
from common.task_data import TaskData, task_data_of

log = logging.getLogger(__name__)
OptimizerFactory = Callable[..., torch.optim.Optimizer]


def writes_logs_at_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning's loggers write the values logged in this training step: every
    `log_every_n_steps`-th optimizer step (counted from 1), and the last when fit stops. Lightning's
    own rule, from public attributes; with manual optimization, ask before the step's optimizer.step()."""
    every = trainer.log_every_n_steps
    return bool(every) and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


class BaseTaskModule(L.LightningModule):
    throughput_unit = "samples"  # what batch_size_of and items_trained count: rays, images, windows, sequences
    # {key under `callbacks:`: prefixes of the metrics that callback logs}: a fit that monitors one of them
    # with that callback off is refused before training (suite.config_checks.check_monitored_callbacks)
    callback_metrics: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # what NHWC weights speed up (channels_last=auto turns them on on a GPU); None: none, or they do not pay
    convolutional: ClassVar[str | None] = None
    # why channels_last=auto leaves NHWC off for a network that has convolutions (printed at start)
    channels_last_note: ClassVar[str | None] = None
    # state-dict entries that belong to a training run, not to its weights (a schedule's position): init_from
    # leaves them out, so they start afresh in the new run (their modules fill in what a checkpoint lacks)
    run_state: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def inapplicable_settings(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        """{key of `model`: why it would go unused} under these settings: an override of one is refused before
        anything is built (suite.config_checks.check_applicable). A task whose options own settings declares them."""
        return {}

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # Factories, not hyperparameters: they are rebuilt from config, never pickled into checkpoints.
        self.optimizer_factory = optimizer
        self.scheduler_config = scheduler
        self.run_config: dict | None = None  # set by run.py; saved with every checkpoint
        # set by run.py when a fresh fit starts from a checkpoint's weights (init_from=): a task that
        # fits state from data at the start of a fit keeps what belongs to those weights
        self.init_from: str | None = None
        # What the data declares (bind_data); None while no datamodule has told the module anything
        self.task_data: TaskData | None = None
        # set by run.py: where compiled kernels are kept between runs, and why this run stays eager under auto
        self.compile_cache_dir: str | None = None
        self.compile_refusal: str | None = None
        self._compile_decision: CompileDecision | None = None
        self._own_grads: set[int] = set()  # where the .grad copies of on_after_backward live
        self.trained_in_step: torch.Tensor | None = None  # a training_step that trains fewer items than its batch

    # ---- the data -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Lightning calls this after the datamodule's own setup: the module takes the data's TaskData
        (`bind_data`). A task that overrides setup calls super().setup(stage) first."""
        trainer = self.attached_trainer
        datamodule = trainer.datamodule if trainer is not None else None
        if datamodule is not None:
            self.bind_data(task_data_of(datamodule))
        if self._compile_decision is None:  # once: a fit's test and the tuners' fits keep it
            # the device the Trainer will move the module to (a stand-in trainer without a strategy: the module's)
            device = getattr(getattr(trainer, "strategy", None), "root_device", None) or self.device
            if shards_parameters(trainer) and not self.compile_refusal:  # not with FSDP's or the stages' wrappers
                self.compile_refusal = "FSDP / pipeline stages shard the parameters; model.compile=true compiles anyway"
            self._decide_compile(device.type)
            if getattr(trainer, "is_global_zero", True):
                log.info(self._compile_decision.line())

    def bind_data(self, data: TaskData) -> None:
        """Keep what the task's data declares (common/task_data.py) as `self.task_data`. A task that builds
        state from it overrides this and calls super; a unit test calls it directly, without a Trainer."""
        self.task_data = data

    # ---- the fast path ------------------------------------------------------------------
    def compile_plan(self) -> CompilePlan | None:
        """Whether torch.compile pays for this task on a GPU (model.compile=auto), how, and why in one
        line; None: the task has nothing it compiles."""
        return None

    def attention_kernel(self) -> str | None:
        """The attention implementation, for the run's start-up lines; None: the network has no attention."""
        return None

    @property
    def compile_decision(self) -> CompileDecision:
        """model.compile resolved (common/fast_path.py): at setup, or at first use without a Trainer."""
        if self._compile_decision is None:
            self._decide_compile(self.device.type)
        return self._compile_decision

    def _decide_compile(self, device_type: str) -> None:
        self._compile_decision = resolve_compile(self.hparams.get("compile", False), device_type, self.compile_plan(),
                                                 self.compile_refusal)
        if self._compile_decision.on and self.compile_cache_dir:
            use_compile_cache(self.compile_cache_dir)

    # ---- optimisation -------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Two groups: weights that decay, and biases / norm weights / scalars that must not."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError(
                f"{type(self).__name__} has no optimizer: pass optimizer=<partial optimizer> "
                "(run.py does this from the `optimizer` config group)."
            )
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if not self.scheduler_config:
            return optimizer
        interval = self.scheduler_config.get("interval", "step")
        if interval not in ("step", "epoch"):
            raise ValueError(f"scheduler.interval must be 'step' or 'epoch', got {interval!r}")
        total = self.trainer.estimated_stepping_batches if interval == "step" else self.trainer.max_epochs
        if total is None or total < 0 or total == float("inf"):
            raise ValueError(
                "The learning-rate schedule needs a finite length: set max_epochs (or trainer.max_steps)."
            )
        scheduler = self.scheduler_config["builder"](optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def accumulates_into_graph_outputs(self) -> bool:
        """Gradients summed over micro-batches (trainer.accumulate_grad_batches > 1) under CUDA graphs: each replay
        writes its outputs, the gradients among them, where the last one did, so a .grad that is one is lost."""
        trainer = self.attached_trainer
        decision = self._compile_decision
        return (trainer is not None and trainer.accumulate_grad_batches > 1 and decision is not None and decision.on
                and decision.mode in CUDA_GRAPH_MODES)

    def on_after_backward(self) -> None:
        """Under CUDA graphs with accumulation, a gradient that is a replay's output becomes a copy of our own, into
        which the next micro-batches' are added (torch's advice for this case). Parameters without one keep None,
        so the optimizer still skips them, as it would eagerly."""
        if not self.accumulates_into_graph_outputs():
            return
        for param in self.parameters():
            grad = param.grad
            if grad is not None and grad.data_ptr() not in self._own_grads:
                param.grad = grad.clone()
                self._own_grads.add(param.grad.data_ptr())

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)  # Lightning's own; the copies of on_after_backward go with them
        self._own_grads.clear()

    def sharded_blocks(self) -> set[type[torch.nn.Module]]:
        """The repeated blocks FSDP shards as separate units (`trainer=fsdp`); none = one unit."""
        return set()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip in the module rather than in Lightning's precision plugin, which refuses fused
        optimizers; under a GradScaler the gradients are unscaled first (the scaler knows)."""
        if not gradient_clip_val:
            return
        if shards_parameters(self.trainer) and gradient_clip_algorithm != "value":
            # each rank holds a shard of every gradient: only FSDP's own method sees the global norm
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def log_train_step(self, values: Mapping[str, torch.Tensor], batch_size: int | None = None) -> None:
        """Log per-step training values, only at the steps Lightning writes (`log_every_n_steps`).
        Each self.log call costs ~0.5 ms of host time, which a launch-bound step (legal_bert's
        MiniLM: ~25 ms on an H100) pays in full; the values of other steps would never be written.
        Called without a Trainer (a plain loop over training_step), it does nothing."""
        trainer = self.attached_trainer
        if trainer is not None and writes_logs_at_this_step(trainer):
            self.log_dict(dict(values), on_step=True, on_epoch=False, batch_size=batch_size)

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or None (a plain loop over training_step, a test)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's `trainer` raises when none is attached
            return None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """train/lr. Not LearningRateMonitor: it logs per param group (lr-AdamW/pg1, /pg2), no train/lr."""
        self.trained_in_step = None  # a step that sets it sets it again; no count outlives its step
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        # A CPU tensor: a Python number would be copied to the GPU with a blocking copy. Made only where it is written.
        if optimizer is not None and writes_logs_at_this_step(self.trainer):
            self.log_train_step({"train/lr": torch.tensor(float(optimizer.param_groups[0]["lr"]))})

    def items_trained(self, batch: Any) -> int | torch.Tensor:
        """Items the last training step trained on, for throughput: its batch's (batch_size_of), or what the step
        set as `trained_in_step` (a count on the device: nerf's rays that a sample budget did not cut short)."""
        return self.batch_size_of(batch) if self.trained_in_step is None else self.trained_in_step

    def batch_size_of(self, batch: Any) -> int:
        """Items in a batch, for throughput: the leading dimension of its first tensor."""
        if isinstance(batch, torch.Tensor):
            return int(batch.shape[0]) if batch.ndim else 1
        items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
        for item in items:
            return self.batch_size_of(item)
        return 0

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        # torch.compile wraps modules as `_orig_mod`; store plain names so checkpoints load anywhere.
        checkpoint["state_dict"] = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): v
                                    for k, v in checkpoint["state_dict"].items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A compiled module expects `_orig_mod` in its names: map plain checkpoint names onto them.
        own = self.state_dict().keys()
        plain_to_own = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): k for k in own}
        if any(plain != k for plain, k in plain_to_own.items()):
            checkpoint["state_dict"] = {plain_to_own.get(k, k): v for k, v in checkpoint["state_dict"].items()}
