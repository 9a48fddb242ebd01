"""legal_bert with its encoder layers split across GPUs as pipeline stages (trainer=pipeline).

Rank r keeps a contiguous share of the encoder layers; the first rank also keeps the embeddings,
the last the pooler and the classification head. Training runs torch.distributed.pipelining's
GPipe schedule: each batch is cut into `num_microbatches`, so while stage 1 works on micro-batch
i, stage 0 already works on i+1. Between stages travels one tensor: the hidden states with the
attention mask appended as one more channel (a stage's inputs must be tensors, and the mask is
needed by every layer).

The schedule wants the same shapes every step: the experiment pads each batch to
`data.max_sequence_length` and drops the last, partial batch of an epoch. Validation, test and
predict send whole batches from stage to stage with plain point-to-point calls, and the last
stage broadcasts the logits, so every rank logs the same metrics.

Why a user would choose this: when the encoder does not fit on one GPU. For a model that fits,
DDP is faster (every GPU works on every layer, with no stage waiting on another).
"""
from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
from transformers.masking_utils import create_bidirectional_mask

from common.parallel import PipelineStages
from lightning_modules.legal_bert.module import LegalBertClassifier

log = logging.getLogger(__name__)


class EncoderStage(nn.Module):
    """One stage's forward. It holds the owning module's own submodules (shared, not copied)."""

    def __init__(self, owner: LegalBertClassifier, layers: list[nn.Module], first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.layers = nn.ModuleList(layers)
        self.__dict__["owner"] = owner  # not a child: its parameters stay registered once, in the owner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        encoder = self.owner.encoder
        if self.first:
            input_ids, mask = inputs
            hidden = encoder.embeddings(input_ids=input_ids)
        else:
            packed, = inputs
            hidden, mask = packed[..., :-1], packed[..., -1]
        mask_4d = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask.long())
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask_4d)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if not self.last:
            return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)
        pooler = encoder.pooler if self.owner.pooling == "pooler" else None
        out = SimpleNamespace(last_hidden_state=hidden, pooler_output=pooler(hidden) if pooler is not None else None)
        return self.owner.classify(out, mask)


class PipelinedLegalBert(LegalBertClassifier):
    def __init__(self, *args: Any, num_microbatches: int = 4, clip_norm: float | None = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False  # the schedule runs forward and backward itself
        # Kept out of the module tree: the stage holds this module's own layers, which must be
        # registered (and saved) once, under their usual names.
        self.__dict__["stage"] = None
        self.schedule: ScheduleGPipe | None = None

    # ---- splitting ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.stage is not None:
            return
        strategy = self.trainer.strategy
        if not isinstance(strategy, PipelineStages) or strategy.world_size == 1:
            return  # one device: the whole model, trained by the same step (the reference run)
        rank, stages = strategy.global_rank, strategy.world_size
        layers = self.encoder.encoder.layer
        if not 2 <= stages <= len(layers):
            raise ValueError(f"trainer.devices={stages}: the encoder's {len(layers)} layers split into 2 to "
                             f"{len(layers)} pipeline stages")
        bounds = [len(layers) * i // stages for i in range(stages + 1)]
        first, last = rank == 0, rank == stages - 1
        mine = [layers[i] for i in range(bounds[rank], bounds[rank + 1])]
        # Free what other stages own: their weights never reach this GPU, and this rank's
        # state dict (merged by the strategy into full checkpoints) names only its own.
        for i in range(len(layers)):
            if not bounds[rank] <= i < bounds[rank + 1]:
                layers[i] = nn.Identity()
        if not first:
            self.encoder.embeddings = nn.Identity()
        if not last:
            self.encoder.pooler = nn.Identity() if self.encoder.pooler is not None else None
            self.head = nn.Identity()
        self.__dict__["stage"] = EncoderStage(self, mine, first, last)
        log.info("Pipeline stage %d of %d: encoder layers %d-%d%s%s", rank, stages, bounds[rank], bounds[rank + 1] - 1,
                 ", embeddings" if first else "", ", pooler and head" if last else "")

    def _schedule(self) -> ScheduleGPipe:
        if self.schedule is None:
            strategy = self.trainer.strategy
            n = self.hparams.num_microbatches
            stage = PipelineStage(self.stage, strategy.global_rank, strategy.world_size, self.device)
            # Gradients of the batch mean: newer torch scales the micro-batch sum by 1/n itself.
            scales = "scale_grads" in inspect.signature(ScheduleGPipe.__init__).parameters
            self._loss_scale = 1.0 if scales else 1.0 / n
            extra = {"scale_grads": True} if scales else {}
            self.schedule = ScheduleGPipe(stage, n, loss_fn=lambda logits, y: self.loss(logits, y) * self._loss_scale,
                                          **extra)
        return self.schedule

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        rank, last = self.trainer.global_rank, self.trainer.world_size - 1
        optimizer.zero_grad(set_to_none=True)
        if self.stage is None:
            loss = self._whole_model_backward(batch)
        else:
            loss = self._pipeline_backward(batch, rank, last)
        if self.hparams.clip_norm:
            if self.stage is None:
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.clip_norm)
            else:
                self.trainer.strategy.clip_grad_norm_(self, self.hparams.clip_norm)
        # before the step: the step count then still names this step (which steps are written)
        self.log_train_step({"train/loss": loss}, batch_size=len(batch["labels"]))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return loss

    def _whole_model_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.manual_backward(loss)
        return loss.detach()

    def _pipeline_backward(self, batch: dict[str, torch.Tensor], rank: int, last: int) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        if rank == 0:
            self._schedule().step(batch["input_ids"], batch["attention_mask"])
        elif rank == last:
            self._schedule().step(target=batch["labels"], losses=losses)
        else:
            self._schedule().step()
        loss = (torch.stack(losses).float().mean() / self._loss_scale if losses
                else torch.zeros((), device=self.device))
        dist.broadcast(loss, src=last)  # every rank logs the same number
        return loss

    # ---- evaluation: whole batches, stage to stage ----------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.stage is None:
            return super().forward(input_ids, attention_mask)
        rank, stages = self.trainer.global_rank, self.trainer.world_size
        batch, length = input_ids.shape
        if rank == 0:
            out = self.stage(input_ids, attention_mask)
        else:
            width = self.encoder.config.hidden_size + 1
            packed = torch.empty(batch, length, width, device=self.device, dtype=torch.float32)
            dist.recv(packed, src=rank - 1)
            out = self.stage(packed)
        if rank < stages - 1:
            dist.send(out.float().contiguous(), dst=rank + 1)
            logits = torch.empty(batch, len(self.label_names), device=self.device, dtype=torch.float32)
        else:
            logits = out.float().contiguous()
        dist.broadcast(logits, src=stages - 1)
        return logits
