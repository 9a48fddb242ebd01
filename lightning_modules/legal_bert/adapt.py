"""Adapt a pretrained BERT to your text by masked-language modelling before fine-tuning on labels.

Task-adaptive pretraining (Gururangan et al. 2020, "Don't Stop Pretraining"): continue the
encoder's masked-LM training on the task's own training sentences, then fine-tune the classifier
from the result. It is what LEGAL-BERT is to BERT, on a small scale and with no download. The
run writes the adapted encoder as a Hugging Face directory, `export_dir` (default
`<run dir>/encoder`), that `model.pretrained_path` of a `legal_bert` run reads:

    python run.py experiment=unfair_tos_adapt data.data_dir=<corpus> run_name=adapt
    python run.py experiment=unfair_tos data.data_dir=<corpus> model.pretrained_path=logs/legal_bert_mlm/adapt/encoder

The masked-LM head comes with BERT checkpoints; for encoder-only checkpoints (the bundled
sentence-transformers MiniLM) it starts from the tied word embeddings and a fresh transform
layer. Only the encoder is exported; the pooling the source was trained with travels with it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from common.parallel import shards_parameters
from common.pretrained import load_tokenizer, resolve_pretrained_path
from lightning_modules.base import BaseTaskModule
from lightning_modules.legal_bert.pretrained import load_encoder

log = logging.getLogger(__name__)


class LegalBertMaskedLM(BaseTaskModule):
    throughput_unit = "sequences"

    def __init__(self, pretrained_path: str | None = None, export_dir: str | None = None,
                 attn_implementation: str = "sdpa", optimizer=None, scheduler=None) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.source = resolve_pretrained_path(pretrained_path)
        self.model = load_encoder(pretrained_path, attn_implementation=attn_implementation, masked_lm=True)
        self.model.train()
        # the masked-LM head: the model's one child besides its encoder (BERT: `cls`, RoBERTa: `lm_head`)
        self.__dict__["head"] = next(m for name, m in self.model.named_children()
                                     if name != self.model.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The masked-LM loss: cross-entropy over the masked positions (labels != -100).

        The vocabulary projection runs on those ~15% of positions only. Over every position it would
        hold a [batch, length, 30522] logits tensor: 4 GB in fp32 at batch 128 and length 256.
        """
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        masked = labels != -100
        logits = self.head(hidden[masked])  # boolean indexing: one host sync for the count
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[masked], reduction="sum")
        return loss / masked.sum().clamp(min=1)  # a batch with nothing masked gives 0, not NaN

    def training_step(self, batch, batch_idx):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log_train_step({"train/loss": loss}, batch_size=len(batch["input_ids"]))
        return loss

    def _eval_step(self, batch, prefix: str) -> None:
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log(f"{prefix}loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val/")

    def test_step(self, batch, batch_idx):  # masked-LM loss on the held-out documents' text (no labels read)
        self._eval_step(batch, "test/")

    def sharded_blocks(self) -> set[type[torch.nn.Module]]:
        layers = getattr(getattr(self.model.base_model, "encoder", None), "layer", None) or []
        return {type(layer) for layer in layers}

    # ---- the product: an encoder directory ------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        if shards_parameters(self.trainer):
            log.warning("The adapted encoder is not exported under a sharded strategy (each rank holds a shard); "
                        "run the adaptation with trainer=ddp or on one device.")
            return
        self.export(self._export_dir())

    def _export_dir(self) -> Path:
        if self.hparams.export_dir:
            return Path(str(self.hparams.export_dir)).expanduser()
        return Path(self.trainer.default_root_dir) / "encoder"

    def export(self, out: Path) -> Path:
        """Encoder weights, config and tokenizer in Hugging Face format, plus a note of where they came from."""
        out.mkdir(parents=True, exist_ok=True)
        self.model.base_model.save_pretrained(out)
        load_tokenizer(self.source).save_pretrained(out)
        if (self.source / "1_Pooling").is_dir():  # sentence-transformers: how the source pools (mean for MiniLM)
            shutil.copytree(self.source / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
        note = {"adapted_from": str(self.source), "objective": "masked language modelling"}
        if self.attached_trainer is not None:
            note.update(epochs=self.current_epoch, optimizer_steps=self.global_step,
                        final_train_loss=float(self.trainer.callback_metrics.get("train/loss", float("nan"))))
        (out / "adaptation.json").write_text(json.dumps(note, indent=1))
        log.info("Adapted encoder written to %s (fine-tune with model.pretrained_path=%s)", out, out)
        print(f"Adapted encoder: {out}")
        return out
