"""Strategies in which no rank holds the whole model: FSDP, and pipeline stages.

FSDP. Lightning's FSDPStrategy wraps the whole LightningModule as one FSDP unit unless it is given a
wrap policy. One unit all-gathers every parameter for every forward, so the memory per GPU never
drops below a whole model. Each task names its repeated blocks (`sharded_blocks()` on the
module: BERT layers, U-Net ResNet and attention blocks); each becomes its own unit, gathered only
while it runs. `trainer.strategy.auto_wrap_policy` in the config still wins when set.

Pipeline. `PipelineStrategy` launches one process per GPU like DDP, but wraps nothing: the
module splits itself into stages (its `configure_model`, e.g. legal_bert's encoder layers) and
runs its own schedule. Every rank reads the same batches (the first stage needs the inputs, the
last the labels). Checkpoints gather the stages into one full state dict, which loads into a
single-device run; each rank's optimizer state is kept beside it for resuming. It mixes in
`common.parallel.PipelineStages`, by which modules and callbacks recognise it without importing
this module (`common.parallel.shards_parameters`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torchmetrics import Metric

from common.host_copy import to_cpu
from common.lightning_private import FSDPWrapping
from common.parallel import PipelineStages

log = logging.getLogger(__name__)


class FSDPStrategy(FSDPWrapping):
    def wrap(self, model):
        if isinstance(model, FullyShardedDataParallel):
            return model
        root = getattr(self, "_root", None)
        if root is not None and root.module is model:
            # The test after fit: the same root again. (Lightning's own method finds the blocks
            # already wrapped, skips the root, and loading the best checkpoint then fails.)
            return root
        kwargs = dict(self.kwargs)
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            kwargs.pop("auto_wrap_policy", None)  # the user wrapped the blocks: only the root is added
        elif kwargs.get("auto_wrap_policy") is None:
            blocks = set(self.lightning_module.sharded_blocks())
            if blocks:
                kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
                log.info("FSDP: sharding each %s as its own unit", ", ".join(sorted(b.__name__ for b in blocks)))
            else:
                log.info("FSDP: %s names no blocks, so the whole model is one unit", type(model).__name__)
        device = self.root_device
        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            # on CPU (gloo, as the tests run) FSDP needs the device itself; Lightning passes None there
            device_id=device if device.type == "cpu" else device.index, **kwargs)
        for metric in (m for m in model.modules() if isinstance(m, Metric)):
            metric.to(device)  # FSDP moves no module without parameters
        self.checkpoint_activations(model)
        self._root = model
        return model


def _optimizer_states_to(optimizers, device) -> None:
    """Each optimizer's state onto `device`, all but its 'step' counts, which stay where PyTorch put them."""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if key != "step":
                    state[key] = move_data_to_device(value, device)


class PipelineStrategy(DDPStrategy, PipelineStages):
    def setup(self, trainer) -> None:
        """DDP's setup without what assumes replicas: no DDP wrapper (the stages hold different
        parameters) and no broadcast of rank 0's weights before evaluation."""
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizer_states_to(self.optimizers, self.root_device)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        return {"num_replicas": 1, "rank": 0}  # the same batches on every stage

    def clip_grad_norm_(self, module, max_norm: float) -> torch.Tensor:
        """Clip by the norm over every stage's gradients; returns that norm."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        local = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.root_device)
        squared = local.float().square()
        dist.all_reduce(squared)
        total = squared.sqrt()
        if grads:
            torch.nn.utils.clip_grads_with_norm_([p for p in module.parameters() if p.grad is not None],
                                                 max_norm, total)
        return total

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Every stage's weights, merged: a checkpoint that loads into a single-device run."""
        own = to_cpu(self.lightning_module.state_dict())
        parts = [None] * self.world_size
        dist.all_gather_object(parts, own)
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part)
        return merged

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        module = self.lightning_module
        own = module.state_dict().keys()
        missing = sorted(set(own) - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"The checkpoint lacks weights of this stage: {missing[:5]}")
        module.load_state_dict({k: checkpoint["state_dict"][k] for k in own}, strict=True)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        parts = [None] * self.world_size
        dist.all_gather_object(parts, to_cpu(super().optimizer_state(optimizer)))
        return {"pipeline_stages": parts}

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            stages = state.get("pipeline_stages")
            if stages is None or len(stages) != self.world_size:
                raise ValueError(f"This checkpoint's optimizer state is for {len(stages or [None])} pipeline stage(s), "
                                 f"not {self.world_size}: resume with the same trainer.devices")
            optimizer.load_state_dict(stages[self.global_rank])

