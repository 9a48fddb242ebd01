from datamodules.diffusion.datamodule import DiffusionDataModule, ImageTensorDataset

__all__ = ["DiffusionDataModule", "ImageTensorDataset"]
