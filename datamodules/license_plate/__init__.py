"""Licence-plate detection data (see docs/tasks/license_plate.md)."""
from datamodules.license_plate.datamodule import LicensePlateDataModule, PlateDataset, collate

__all__ = ["LicensePlateDataModule", "PlateDataset", "collate"]
