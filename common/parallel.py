"""How the run's strategy spreads the model and the data over ranks, asked by every layer.

`shards_parameters(trainer)` is what callbacks and modules ask before doing per-rank work on the
weights: no rank holds whole parameters then (FSDP, pipeline stages), and a forward pass needs every
rank. `data_parallel_size(trainer)` is how many ranks read different batches. A strategy that splits
the model's layers into stages mixes in `PipelineStages`, by which a module that splits itself
recognises it (suite.strategies.PipelineStrategy does).
"""
from __future__ import annotations

import logging

from lightning.pytorch.strategies import FSDPStrategy

log = logging.getLogger(__name__)


class PipelineStages:
    """Marks a strategy under which each rank holds a contiguous share of the model's layers and every
    rank reads the same batches. Lives here so that modules can test for it without importing the suite."""


def shards_parameters(trainer) -> bool:
    """True when no rank holds the whole model between steps (FSDP, pipeline stages)."""
    return isinstance(getattr(trainer, "strategy", None), (FSDPStrategy, PipelineStages))


def skipped_when_sharded(trainer, what: str, instead: str) -> bool:
    """True when no rank holds the whole model (`shards_parameters`), saying once per run that `what` is
    skipped and what to do instead. Whatever needs whole weights or gradients outside a step asks this."""
    if not shards_parameters(trainer):
        return False
    told = trainer.__dict__.setdefault("_suite_told_sharded", set())
    if what not in told:
        told.add(what)
        log.warning("%s skipped: no rank holds the whole model under %s. %s", what,
                    type(trainer.strategy).__name__, instead)
    return True


def data_parallel_size(trainer) -> int:
    """How many ranks read different batches: every rank under DDP and FSDP, one under pipelining."""
    strategy = getattr(trainer, "strategy", None)
    try:
        return int(strategy.distributed_sampler_kwargs["num_replicas"])
    except (AttributeError, KeyError, TypeError, AssertionError):
        return int(getattr(trainer, "world_size", 1) or 1)
