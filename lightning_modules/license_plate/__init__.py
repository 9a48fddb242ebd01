"""Licence-plate detection (see docs/tasks/license_plate.md)."""
from lightning_modules.license_plate.module import LicensePlateModule, draw_detections, filter_detections

__all__ = ["LicensePlateModule", "draw_detections", "filter_detections"]
