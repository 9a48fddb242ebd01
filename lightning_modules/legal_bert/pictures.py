"""The legal_bert classifier's pictures: confusion matrix, per-class F1 and last-layer attention maps,
saved as run artifacts (every `plot_every_n_epochs` validations, and after test)."""
from __future__ import annotations

from typing import Any

import torch

from common.parallel import skipped_when_sharded
from lightning_modules.legal_bert import plots


class ClassifierPictures:
    """Mixed into LegalBertClassifier: uses its trainer, hparams, encoder, label names, thresholds and the
    bound TaskData (val_set and tokenizer for the attention maps)."""

    def _plot(self, report: dict[str, Any], split: str, attention: bool = True) -> None:
        from common.pictures import save_image

        epoch = f"epoch{self.current_epoch:03d}"
        if report["confusion"] is not None:
            save_image(self.trainer, f"{split}_confusion_matrix_{epoch}",
                       plots.confusion_matrix_figure(report["confusion"], report["names"], f"{split} {epoch}"))
        save_image(self.trainer, f"{split}_class_f1_{epoch}",
                   plots.class_f1_figure(report["class_f1"], report["names"], f"{split} per-class F1, {epoch}"))
        if not (attention and self.hparams.num_attention_examples):
            return
        if not skipped_when_sharded(self.trainer, "Attention maps", "A forward pass there needs every rank."):
            data = self.task_data
            if data is not None and data.val_set is not None and len(data.val_set):
                self._plot_attention(data.val_set, data.tokenizer, epoch)

    @torch.no_grad()
    def _plot_attention(self, dataset, tokenizer, epoch: str) -> None:
        """Last-layer attention (mean over heads) of a few short validation examples."""
        from common.pictures import save_image

        limit = self.hparams.attention_max_tokens
        picks = [i for i in range(len(dataset)) if dataset.lengths[i] <= limit][: self.hparams.num_attention_examples]
        if not picks:
            picks = list(range(min(self.hparams.num_attention_examples, len(dataset))))
        previous = self.encoder.config._attn_implementation
        was_training = self.training
        self.eval()
        try:
            self.encoder.set_attn_implementation("eager")
            for n, i in enumerate(picks):
                ids = dataset[i]["input_ids"][:limit].long().unsqueeze(0).to(self.device)
                mask = torch.ones_like(ids)
                out = self.encoder(input_ids=ids, attention_mask=mask, output_attentions=True)
                attn = out.attentions[-1][0].float().mean(0).cpu()
                # from this same uncompiled pass: a compiled encoder is never called in eager mode
                probs = self.probabilities(self.classify(out, mask))[0].cpu()
                tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
                title = plots.prediction_title(probs, self.label_names, self.multi_label, self.thresholds.cpu())
                save_image(self.trainer, f"val_attention_{n}_{epoch}", plots.attention_figure(attn, tokens, title))
        finally:
            self.encoder.set_attn_implementation(previous)
            self.train(was_training)
