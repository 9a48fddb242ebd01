"""NeRF datasets: Blender, instant-ngp/nerfstudio and LLFF scenes, plus a built-in procedural scene."""
from datamodules.nerf.datamodule import NerfDataModule, RayBatches, ViewDataset
from datamodules.nerf.formats import NerfDataError

__all__ = ["NerfDataError", "NerfDataModule", "RayBatches", "ViewDataset"]

