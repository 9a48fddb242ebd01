"""Loss curves and the learning-rate schedule as actually applied, as PNG in <run dir>/plots/.

Written at the end of fit (and to W&B when it is on); the history lives in the callback's
checkpoint state, so a resumed run plots its whole history. On request, for any run:
    python -m callbacks.plots logs/<task>/<run>
"""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt


class TrainingCurves(L.Callback):
    def __init__(self, every_n_steps: int = 10) -> None:
        self.every = max(1, every_n_steps)
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": [], "lr": []}
        # Losses stay on the device until a moment that waits for it anyway (validation, a checkpoint,
        # the end): reading each to the host would stall the GPU queue every few steps.
        self._unread: list[tuple[int, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.optimizers:
            self.history["lr"].append((step, float(trainer.optimizers[0].param_groups[0]["lr"])))
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and step % self.every == 0:
            self._unread.append((step, loss.detach()))

    def _read_losses(self) -> None:
        if self._unread:
            values = torch.stack([v.float() for _, v in self._unread]).tolist()  # one host transfer
            self.history["train/loss"].extend(zip([s for s, _ in self._unread], values, strict=True))
            self._unread = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._read_losses()
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not trainer.sanity_checking:
            self.history["val/loss"].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer, pl_module) -> None:
        from common.pictures import save_image

        self._read_losses()
        for name, figure in render(self.history).items():
            save_image(trainer, name, figure)

    def state_dict(self) -> dict:
        self._read_losses()
        return {k: [list(p) for p in v] for k, v in self.history.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.items()}


def render(history: dict) -> dict:
    figures = {}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if history.get(key):
            steps, values = zip(*history[key], strict=True)
            ax.plot(steps, values, style, label=key, markersize=3)
    ax.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    if any(v for _, v in history.get("train/loss", []) if v > 0):
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:  # nothing logged yet (e.g. no validation and no step written)
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    figures["loss_curves"] = fig
    if history.get("lr"):
        fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
        steps, values = zip(*history["lr"], strict=True)
        ax.plot(steps, values)
        ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate as applied")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures["lr_schedule"] = fig
    return figures


def main(run_dir: str) -> None:
    """Plot a run's history from its last.ckpt."""
    import torch
    from PIL import Image

    from common.pictures import to_array

    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = next((v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("TrainingCurves")), None)
    if state is None:
        sys.exit(f"{path} holds no TrainingCurves history")
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    for name, figure in render(state).items():
        Image.fromarray(to_array(figure)).save(out / f"{name}.png")
        print(out / f"{name}.png")


if __name__ == "__main__":
    main(sys.argv[1])
