"""The NeRF task's pictures: depth and error maps in colour, the tiles saved for a rendered view, and predict's
frames and GIFs."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def depth_range(depth: Tensor, batch: dict) -> tuple[float, float]:
    near, far = float(batch["near"][0]), float(batch["far"][0])
    lo = max(near, float(depth.min()))
    hi = min(far, float(depth.max()))
    return (lo, hi) if hi > lo else (near, far)


def colorize(values: Tensor, lo: float, hi: float, cmap: str = "turbo") -> Tensor:
    """Map an (H, W) tensor to (H, W, 3) colours in [0, 1] with a matplotlib colormap."""
    import matplotlib

    x = ((values.float().cpu() - lo) / max(hi - lo, 1e-8)).clamp(0, 1).numpy()
    return torch.from_numpy(matplotlib.colormaps[cmap](x)[..., :3]).float()


def depth_colours(depth: Tensor, batch: dict) -> Tensor:
    """An (H, W) depth map in colour, over the depths it holds within the view's near..far."""
    return colorize(depth, *depth_range(depth, batch))


def view_tiles(result: dict, batch: dict) -> tuple[Tensor, str | None]:
    """One (H, k*W, 3) picture of a rendered view: ground truth | render | depth | |error| (0..0.25) where the
    view has a target, else render | depth; upscaled to at least 256 rows. Its caption (None without a target)."""
    tiles = [result["target"], result["rgb"]] if "target" in result else [result["rgb"]]
    tiles.append(depth_colours(result["depth"], batch))
    if "target" in result:
        error = (result["rgb"] - result["target"]).abs().mean(-1)
        tiles.append(colorize(error, 0.0, 0.25, "inferno"))
    image = torch.cat([t.float().cpu() for t in tiles], dim=1)
    scale = max(1, 256 // image.shape[0])
    if scale > 1:
        image = image.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return image, "ground truth | render | depth | |error| (0..0.25)" if "target" in result else None


def save_renders(predictions: list[dict], output_dir: Path) -> None:
    """Predict's rendered views as output_dir/render/frame_NNNN.png and depth_NNNN.png, in index order, and the
    sequence as render.gif and depth.gif."""
    from PIL import Image

    out = output_dir / "render"
    out.mkdir(parents=True, exist_ok=True)
    frames, depths = [], []
    for p in sorted(predictions, key=lambda p: p["index"]):
        frames.append(Image.fromarray(p["rgb"].numpy()))
        depths.append(Image.fromarray(p["depth"].numpy()))
        frames[-1].save(out / f"frame_{p['index']:04d}.png")
        depths[-1].save(out / f"depth_{p['index']:04d}.png")
    if frames:
        for name, seq in (("render.gif", frames), ("depth.gif", depths)):
            seq[0].save(output_dir / name, save_all=True, append_images=seq[1:], duration=80, loop=0)
    log.info("Wrote %d frames to %s and %s", len(frames), out, output_dir / "render.gif")
