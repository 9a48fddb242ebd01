"""Pictures for the clinical forecasting task: forecasts of a few validation windows and the
transformer's attention maps (one panel per layer, averaged over heads)."""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch

from common.pictures import save_image
from common.task_data import task_data_of

log = logging.getLogger(__name__)


def first_real_patch(present: torch.Tensor, num_patches: int) -> int:
    """Index of the first patch holding any real input: patches before it are left padding."""
    patch_len = -(-len(present) // num_patches)   # the network pads on the left to whole patches
    padded = torch.cat([present.new_zeros(num_patches * patch_len - len(present)), present])
    per_patch = padded.reshape(num_patches, patch_len).any(1)
    return int(per_patch.nonzero()[0]) if per_patch.any() else 0


class ForecastPlots(L.Callback):
    """Every `every_n_epochs` validation epochs (and after the last), on rank zero.

    Writes plots/forecast_epochNNN.png (context tail, truth, model, persistence and ridge for
    `num_windows` validation windows spread over the set) and plots/attention_epochNNN.png.
    """

    def __init__(self, every_n_epochs: int = 10, num_windows: int = 4, context_tail: int = 72) -> None:
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_windows = int(num_windows)
        self.context_tail = int(context_tail)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_windows < 1:
            return
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        dataset = task_data_of(trainer.datamodule).val_set if trainer.datamodule is not None else None
        if dataset is None or len(dataset) == 0:
            return
        try:
            self._plot(trainer, pl_module, dataset, epoch)
        except Exception as err:  # noqa: BLE001  (a picture must never stop training)
            log.warning("Forecast plots failed: %s", err)

    @torch.no_grad()
    def _plot(self, trainer, pl_module, dataset, epoch: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        idx = np.linspace(0, len(dataset) - 1, min(self.num_windows, len(dataset))).round().astype(int)
        items = [dataset[int(i)] for i in idx]
        batch = {k: torch.stack([it[k] for it in items]).to(pl_module.device) for k in ("x", "observed", "present",
                                                                                        "minute", "y")}
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.forecast(batch, return_attention=True)
        pl_module.train(was_training)
        L_, H = batch["x"].shape[1], batch["y"].shape[1]
        tail = min(self.context_tail, L_)
        t_in = np.arange(-tail + 1, 1)
        t_out = np.arange(1, H + 1)
        fig, axes = plt.subplots(1, len(items), figsize=(4 * len(items), 3.2), squeeze=False)
        for j, ax in enumerate(axes[0]):
            x = batch["x"][j, -tail:, 0].float().cpu().numpy()
            present = batch["present"][j, -tail:].cpu().numpy()
            ax.plot(t_in[present], x[present], color="0.3", lw=1, label="context")
            ax.plot(t_out, batch["y"][j].float().cpu().numpy(), color="k", lw=1.5, label="truth")
            for name, color in (("model", "tab:red"), ("persistence", "tab:gray"), ("ridge", "tab:blue")):
                if name in out:
                    ax.plot(t_out, out[name][j].float().cpu().numpy(), color=color, lw=1.2,
                            ls="-" if name == "model" else "--", label=name)
            ax.axvline(0.5, color="0.7", lw=0.8)
            ax.set_xlabel("steps from forecast origin")
            if j == 0:
                ax.set_ylabel("value")
                ax.legend(fontsize=7)
        fig.suptitle(f"validation forecasts, epoch {epoch}")
        fig.tight_layout()
        save_image(trainer, f"forecast_epoch{epoch:03d}", fig)

        maps = out.get("attention") or []
        if maps:
            present = batch["present"].cpu()
            j = int(present.sum(1).argmax())                   # the window with the most real inputs
            first = first_real_patch(present[j], maps[0].shape[-1])
            fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2), squeeze=False)
            for layer, (ax, w) in enumerate(zip(axes[0], maps, strict=True)):
                ax.imshow(w[j, first:, first:].float().cpu().numpy(), cmap="viridis", vmin=0,
                          extent=(first - 0.5, w.shape[-1] - 0.5, w.shape[-1] - 0.5, first - 0.5))
                ax.set_title(f"layer {layer + 1}")
                ax.set_xlabel("key patch")
                ax.set_ylabel("query patch")
            real = int(present[j].sum())
            fig.suptitle(f"attention (mean over heads), window {int(idx[j])} ({real} of {L_} inputs real, "
                         f"padding patches left out), epoch {epoch}")
            fig.tight_layout()
            save_image(trainer, f"attention_epoch{epoch:03d}", fig)
