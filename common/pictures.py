"""Pictures a person looks at: saved as PNG under <run dir>/plots/ and sent to W&B when it is on."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def plots_dir(trainer) -> Path:
    path = Path(trainer.default_root_dir) / "plots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_array(image: Any) -> np.ndarray:
    """Accepts a matplotlib Figure, a PIL image, or an HxW / HxWxC array (uint8 or float in [0, 1])."""
    if hasattr(image, "savefig"):
        image.canvas.draw()
        array = np.asarray(image.canvas.buffer_rgba())[..., :3].copy()
        import matplotlib.pyplot as plt

        plt.close(image)
        return array
    array = np.asarray(image)
    if hasattr(image, "detach"):
        array = image.detach().float().cpu().numpy()
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


def save_image(trainer, name: str, image: Any, caption: str | None = None) -> Path | None:
    """Write `plots/<name>.png` (rank zero only) and log it to every W&B logger of the trainer."""
    if not trainer.is_global_zero:
        return None
    from PIL import Image

    array = to_array(image)
    path = plots_dir(trainer) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                logger.log_image(key=name.split("_epoch")[0], images=[array], caption=[caption or name],
                                 step=trainer.global_step)
            except Exception as err:  # a dashboard hiccup must not stop training
                log.warning("Could not send %s to W&B: %s", name, err)
    return path
