"""Forecasting metrics in the data's own units: RMSE / MAE overall and per horizon step, MSE,
MAPE, and the Clarke error grid (Clarke et al., Diabetes Care 1987) for glucose in mg/dL."""
from __future__ import annotations

import torch
from torchmetrics import Metric


def clarke_zones(reference: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Clarke error grid zone of each pair, 0..4 for A..E (reference and prediction in mg/dL).

    Zone A: within 20% of the reference, or both hypoglycaemic (< 70).
    Zone E: erroneous treatment (reference >= 180 and prediction <= 70, or the reverse).
    Zone C: overcorrection (prediction >= reference + 110 for 70 <= reference <= 290, or
            prediction <= 7/5 reference - 182 for 130 <= reference <= 180).
    Zone D: dangerous failure to detect (reference >= 240 with 70 <= prediction <= 180, or
            reference <= 175/3 with 70 <= prediction <= 180, or 175/3 <= reference <= 70 with
            prediction >= 6/5 reference).
    Zone B: everything else (benign errors). Rules are applied in the order A, E, C, D, B.
    """
    r, p = reference.float(), prediction.float()
    a = ((r <= 70) & (p <= 70)) | ((p <= 1.2 * r) & (p >= 0.8 * r))
    e = ((r >= 180) & (p <= 70)) | ((r <= 70) & (p >= 180))
    c = (((r >= 70) & (r <= 290)) & (p >= r + 110)) | (((r >= 130) & (r <= 180)) & (p <= 7 / 5 * r - 182))
    d = (((r >= 240) & (p >= 70) & (p <= 180)) | ((r <= 175 / 3) & (p <= 180) & (p >= 70))
         | (((r >= 175 / 3) & (r <= 70)) & (p >= 6 / 5 * r)))
    zone = torch.full_like(r, 1, dtype=torch.long)  # B
    zone = torch.where(d, torch.full_like(zone, 3), zone)
    zone = torch.where(c, torch.full_like(zone, 2), zone)
    zone = torch.where(e, torch.full_like(zone, 4), zone)
    zone = torch.where(a, torch.full_like(zone, 0), zone)
    return zone


class ForecastMetrics(Metric):
    """Accumulates squared / absolute / percentage errors per horizon step and Clarke zones.

    update(pred, target) with [N, H] tensors in the data's units; NaN targets are skipped.
    compute() returns a dict: mse, rmse, mae, mape (%), rmse_step / mae_step ([H] tensors),
    and, with clarke=True, clarke_a / clarke_ab / clarke_zones (% of points in A, A+B, each zone).
    Overall RMSE is over every (window, step) pair, i.e. sqrt of the mean over steps of the MSE.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, horizon: int, clarke: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.horizon = int(horizon)
        self.clarke = clarke
        for name in ("sse", "sae", "sape", "count"):
            self.add_state(name, default=torch.zeros(self.horizon, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("zones", default=torch.zeros(5, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.shape[-1] != self.horizon:
            raise ValueError(f"ForecastMetrics expects [N, {self.horizon}] predictions and targets, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        pred, target = pred.double(), target.double()
        ok = torch.isfinite(target)
        err = torch.where(ok, pred - target, torch.zeros_like(pred))
        self.sse += (err ** 2).sum(0)
        self.sae += err.abs().sum(0)
        denom = torch.where(ok, target.abs().clamp_min(1e-6), torch.ones_like(target))
        self.sape += (err.abs() / denom).sum(0)
        self.count += ok.sum(0)
        if self.clarke:
            zones = clarke_zones(torch.where(ok, target, pred), pred)[ok]
            self.zones += torch.bincount(zones, minlength=5).double()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp_min(1)
        mse_step = self.sse / n
        total = self.count.sum().clamp_min(1)
        out = {
            "mse": self.sse.sum() / total,
            "rmse": (self.sse.sum() / total).sqrt(),
            "mae": self.sae.sum() / total,
            "mape": 100 * self.sape.sum() / total,
            "rmse_step": mse_step.sqrt(),
            "mae_step": self.sae / n,
        }
        if self.clarke:
            pct = 100 * self.zones / self.zones.sum().clamp_min(1)
            out.update(clarke_a=pct[0], clarke_ab=pct[0] + pct[1], clarke_zones=pct)
        return out


def flatten(values: dict[str, torch.Tensor], prefix: str, interval_minutes: float,
            report_minutes=(30, 60), per_step: bool = True) -> dict[str, torch.Tensor]:
    """Scalar log entries: prefix/rmse, prefix/rmse_30min, prefix/rmse_step01, ..."""
    out = {}
    for key in ("rmse", "mae", "mse", "mape", "clarke_a", "clarke_ab"):
        if key in values:
            out[f"{prefix}/{key}"] = values[key].float()
    horizon = values["rmse_step"].numel()
    for minutes in report_minutes:
        step = round(minutes / interval_minutes)
        if 1 <= step <= horizon and abs(step * interval_minutes - minutes) < 1e-6:
            out[f"{prefix}/rmse_{minutes}min"] = values["rmse_step"][step - 1].float()
            out[f"{prefix}/mae_{minutes}min"] = values["mae_step"][step - 1].float()
    if per_step:
        for k in range(horizon):
            out[f"{prefix}/rmse_step{k + 1:02d}"] = values["rmse_step"][k].float()
            out[f"{prefix}/mae_step{k + 1:02d}"] = values["mae_step"][k].float()
    return out
