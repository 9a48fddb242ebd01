"""Several fine-tuned legal_bert models voting as one: the mean of their probabilities.

On UNFAIR-ToS an ensemble of four MiniLM fine-tunes scored 0.9 to 1.4 points of macro-F1 above its
members' mean, more than their weight average (a soup) did, at four times the cost of predicting
(BENCHMARKS.md). It is built from checkpoints, not trained:

    python -m suite.soup --ensemble ens.ckpt 'logs/legal_bert/multirun_tos/*/checkpoints/last.ckpt'
    python run.py mode=test ckpt_path=ens.ckpt        # or mode=predict

The ensemble checkpoint holds every member's weights and the first member's hyperparameters, which
rebuild each member. The evaluation code is the classifier's: the same metrics, plots and prediction
files. A label is predicted when the mean probability passes the mean of the members' thresholds.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.config import to_plain
from lightning_modules.base import BaseTaskModule
from lightning_modules.legal_bert.module import LegalBertClassifier


class LegalBertEnsemble(LegalBertClassifier):
    def __init__(self, member: dict[str, Any], num_members: int, optimizer=None, scheduler=None, **_model_config) -> None:
        # _model_config: the members' own model config, kept beside `member` in the ensemble's run config so
        # interpolations such as data.tokenizer_path=${model.pretrained_path} still resolve; unused here.
        BaseTaskModule.__init__(self, optimizer, scheduler)  # not the classifier's: it would load an encoder
        member = to_plain(member)  # from run.py's config: plain values for the checkpoint
        self.save_hyperparameters({"member": member, "num_members": num_members})
        if num_members < 2:
            raise ValueError(f"An ensemble needs at least 2 members; got num_members={num_members}")
        if not member.get("label_names"):
            raise ValueError("Ensemble members need their label names (the member checkpoints' hyperparameters)")
        self.members = nn.ModuleList(LegalBertClassifier(**member) for _ in range(num_members))
        first = self.members[0]
        self.label_names, self.multi_label = first.label_names, first.multi_label
        self.register_buffer("thresholds", first.thresholds.clone())  # the loaded members' mean: on_load_checkpoint
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")

    def setup(self, stage: str) -> None:
        BaseTaskModule.setup(self, stage)  # binds the data; the classifier's setup would build a head
        names = self.task_data.label_names if self.task_data is not None else None
        if names is not None and list(names) != self.label_names:
            raise ValueError(f"The data's labels {list(names)} differ from the ensemble's {self.label_names}")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        BaseTaskModule.on_load_checkpoint(self, checkpoint)  # the members' heads are built already
        state = checkpoint["state_dict"]
        members = [state[f"members.{i}.thresholds"] for i in range(len(self.members)) if f"members.{i}.thresholds" in state]
        if members:
            state["thresholds"] = torch.stack(members).float().mean(0)

    def attention_kernel(self) -> str:
        return self.members[0].attention_kernel()  # the members share one encoder config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits whose probabilities are the members' mean probabilities, so every metric, threshold
        and prediction file of the classifier applies unchanged."""
        probs = torch.stack([m.probabilities(m(input_ids, attention_mask)) for m in self.members]).mean(0)
        return torch.logit(probs, eps=1e-7) if self.multi_label else probs.clamp_min(1e-12).log()

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.members[0].loss(logits, labels)

    def training_step(self, batch, batch_idx):
        raise RuntimeError("An ensemble is built from trained checkpoints (python -m suite.soup --ensemble), "
                           "not trained: train its members with model=legal_bert")

    def validation_step(self, batch, batch_idx):
        probs = self.probabilities(self(batch["input_ids"], batch["attention_mask"]))
        self._update_metrics(self.val_metrics, probs, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val/")
