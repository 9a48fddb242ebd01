from lightning_modules.clinical.metrics import ForecastMetrics, clarke_zones
from lightning_modules.clinical.module import ClinicalForecaster
from lightning_modules.clinical.network import PatchTransformer

__all__ = ["ClinicalForecaster", "ForecastMetrics", "PatchTransformer", "clarke_zones"]
