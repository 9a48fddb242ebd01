"""Forecast a patient's signal `prediction_horizon` steps ahead from `sequence_length` past steps."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.fast_path import CUDA_GRAPHS, CompilePlan, CompileSetting, compiled
from common.network_config import build_network, network_config
from common.task_data import TaskData
from lightning_modules.base import BaseTaskModule
from lightning_modules.clinical.metrics import ForecastMetrics, flatten

log = logging.getLogger(__name__)

LOSSES = ("mse", "mae", "huber")
# model.net: the network, built with the channels, lengths and gradient_checkpointing the module derives
NET_TARGET = "lightning_modules.clinical.network.PatchTransformer"
# the network's settings that were the module's own before model.net (checkpoints from then load)
NET_SETTINGS = ("patch_len", "d_model", "n_heads", "n_layers", "d_ff", "dropout", "causal",
                "linear_skip_lags")


def fill_missing(x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Carry the last present value forward over gaps (and the first one back over padding). [B, L]."""
    L = x.shape[-1]
    pos = torch.arange(L, device=x.device).expand_as(x)
    idx = torch.where(present, pos, torch.full_like(pos, -1)).cummax(-1).values
    first = present.to(torch.int8).argmax(-1, keepdim=True).expand_as(idx)
    idx = torch.where(idx < 0, first, idx)
    return x.gather(-1, idx)


RIDGE_ALPHAS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def ridge_solve(feats: np.ndarray, target: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form ridge; the last feature is the intercept and is not shrunk."""
    reg = alpha * np.eye(feats.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(feats.T @ feats + reg, feats.T @ target)


def blocked_cv_alpha(feats: np.ndarray, target: np.ndarray, folds: int = 5,
                     alphas: tuple[float, ...] = RIDGE_ALPHAS) -> float:
    """The ridge alpha with the lowest mean squared error over `folds` contiguous blocks of the
    training windows, each held out in turn. The blocks are contiguous because overlapping windows
    next to each other nearly repeat one another; leaving out single windows would favour too
    little shrinkage. Only training data is used."""
    n = len(feats)
    if n < 2 * folds:
        return 1.0
    edges = np.linspace(0, n, folds + 1).astype(int)
    scores = []
    for alpha in alphas:
        err = 0.0
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            keep = np.r_[0:a, b:n]
            w = ridge_solve(feats[keep], target[keep], alpha)
            err += float(((feats[a:b] @ w - target[a:b]) ** 2).sum())
        scores.append(err / n)
    return float(alphas[int(np.argmin(scores))])


class ClinicalForecaster(BaseTaskModule):
    """PatchTST-style transformer forecaster with persistence and ridge baselines beside it.

    The network is `net`, a config with its own `_target_` (model.net; common/network_config.py),
    built with the input channels, lengths and gradient_checkpointing this module derives.

    Scaling (mean / std per input channel) is fitted on the training split by the datamodule and
    kept in this module's buffers, so a checkpoint forecasts in the original units on its own.
    The ridge autoregression (on the last `ridge_lags` steps, relative to the last value) is
    fitted on training windows at the module's setup for fit and is kept in buffers too.
    """

    throughput_unit = "windows"

    def __init__(
        self,
        sequence_length: int = 1440,
        prediction_horizon: int = 12,
        covariates: Sequence[str] = (),
        interval_minutes: float = 5.0,
        net: Mapping[str, Any] | None = None,
        skip_init: str = "ridge",
        loss: str = "mse",
        huber_delta: float = 1.0,
        baselines: bool = True,
        ridge_lags: int = 96,
        ridge_alpha: float | str = 1.0,
        ridge_max_windows: int = 20000,
        clarke: bool = True,
        report_minutes: Sequence[int] = (30, 60),
        compile: CompileSetting = "auto",
        gradient_checkpointing: bool = False,
        optimizer=None,
        scheduler=None,
        **flat_net: Any,
    ) -> None:
        super().__init__(optimizer, scheduler)
        # plain lists, not OmegaConf ListConfigs: checkpoints must load with weights_only=True
        covariates = [str(c) for c in (covariates or ())]
        report_minutes = [int(m) for m in (report_minutes or ())]
        net = network_config(net, flat_net, NET_TARGET, NET_SETTINGS, type(self).__name__)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", *flat_net])
        if skip_init not in ("ridge", "zero"):
            raise ValueError(f"model.skip_init={skip_init!r}; choose ridge or zero")
        if loss not in LOSSES:
            raise ValueError(f"model.loss={loss!r}; choose one of {LOSSES}")
        if ridge_alpha != "auto" and not (isinstance(ridge_alpha, (int, float)) and ridge_alpha >= 0):
            raise ValueError(f"model.ridge_alpha={ridge_alpha!r}; use a number >= 0, or auto (blocked cross-validation "
                             "on the training windows)")
        channels = 1 + len(covariates or ())
        self.net = build_network(net, in_channels=channels, sequence_length=sequence_length,
                                 horizon=prediction_horizon, gradient_checkpointing=gradient_checkpointing)
        self.register_buffer("value_mean", torch.zeros(channels))
        self.register_buffer("value_std", torch.ones(channels))
        self.ridge_lags = max(1, min(int(ridge_lags), sequence_length))
        self.register_buffer("ridge_weight", torch.zeros(self.ridge_lags + 1, prediction_horizon))
        self.register_buffer("fitted", torch.zeros(2, dtype=torch.bool))  # [scaler, ridge]
        self._ready = [False, False]  # python mirror of `fitted`: no device sync in the steps
        self.val_metrics = nn.ModuleDict({name: ForecastMetrics(prediction_horizon, clarke)
                                          for name in ("model", "persistence", "ridge")})
        self.test_metrics: dict[str, dict[str, ForecastMetrics]] = {}
        self.test_names: list[str] = ["test"]

    # ---- scaling and baselines ------------------------------------------------------------
    def set_scaler(self, scaler: dict[str, Sequence[float]]) -> None:
        """Use the training split's mean/std (TaskData.scaler) for inputs and targets."""
        mean = torch.as_tensor(scaler["mean"], dtype=torch.float32)
        std = torch.as_tensor(scaler["std"], dtype=torch.float32)
        if mean.shape != self.value_mean.shape:
            raise ValueError(f"The data has {mean.numel()} channels (target + covariates) but the model was built for "
                             f"{self.value_mean.numel()}: set model.covariates to data.covariate_columns")
        self.value_mean.copy_(mean)
        self.value_std.copy_(std)
        self.fitted[0] = True
        self._ready[0] = True

    @torch.no_grad()
    def fit_ridge(self, dataset) -> None:
        """Closed-form ridge from the last `ridge_lags` inputs (minus the last value) to the target deltas."""
        x, present, y = dataset.arrays(limit=self.hparams.ridge_max_windows)
        if len(x) == 0:
            return
        x = self._scale_target(fill_missing(x.to(self.value_mean.device), present.to(self.value_mean.device)))
        y = self._scale_target(y.to(x.device))
        last = x[:, -1:]
        feats = torch.cat([x[:, -self.ridge_lags:] - last, torch.ones_like(last)], 1).double().cpu().numpy()
        target = (y - last).double().cpu().numpy()
        alpha = self.hparams.ridge_alpha
        if alpha == "auto":
            alpha = blocked_cv_alpha(feats, target)
        w = ridge_solve(feats, target, float(alpha))
        self.ridge_weight.copy_(torch.from_numpy(w).float())
        self.fitted[1] = True
        self._ready[1] = True
        log.info("Ridge baseline fitted on %d training windows (%d lags, alpha=%g%s)", len(feats), self.ridge_lags,
                 float(alpha), ", chosen by blocked cross-validation" if self.hparams.ridge_alpha == "auto" else "")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if "fitted" in state_dict:
            self._ready = [bool(v) for v in state_dict["fitted"].tolist()]
        return result

    def _from_data(self, fit_ridge: bool) -> None:
        """Scaling, ridge baseline and test names from the bound TaskData (scaler, train_set, test_set_names)."""
        data = self.task_data or TaskData()
        # a fit from init_from's weights keeps their scaling: those weights learned in its units
        refit_scaler = fit_ridge and not self.init_from
        if data.scaler is not None and (refit_scaler or not self._ready[0]):
            self.set_scaler(data.scaler)
        if not self._ready[0]:
            raise RuntimeError("The model has no scaling: train it first, or give a trained checkpoint (ckpt_path=...)")
        if self.hparams.baselines and data.train_set is not None and (fit_ridge or not self._ready[1]):
            self.fit_ridge(data.train_set)
        if data.test_set_names:
            self.test_names = list(data.test_set_names)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # In setup, not at fit start: the tuners (mode=tune_lr, tune_batch_size) run their own fit loop first.
        # A resumed fit restores its checkpoint after setup, over what this fits.
        if stage == "fit":
            self._from_data(fit_ridge=True)
            if not self.init_from:  # fresh weights only
                self.init_skip_from_ridge()

    @torch.no_grad()
    def init_skip_from_ridge(self) -> bool:
        """Start the linear skip at the ridge solution, so the untrained model forecasts like ridge.

        Needs skip_init=ridge, a fitted ridge and linear_skip_lags == ridge_lags; the transformer
        head starts at zero and learns what the linear model misses.
        """
        skip = getattr(self.net, "skip", None)
        if self.hparams.skip_init != "ridge" or skip is None or not self._ready[1]:
            return False
        if self.net.skip_lags != self.ridge_lags:
            log.info("skip_init=ridge needs linear_skip_lags == ridge_lags (%d != %d); skip starts at zero",
                     self.net.skip_lags, self.ridge_lags)
            return False
        skip.weight.copy_(self.ridge_weight[:-1].T)
        skip.bias.copy_(self.ridge_weight[-1])
        return True

    def on_validation_start(self) -> None:
        if not self.trainer.training and not self.trainer.sanity_checking:
            self._from_data(fit_ridge=False)

    def on_test_start(self) -> None:
        self._from_data(fit_ridge=False)

    def on_predict_start(self) -> None:
        if not self._ready[0]:
            raise RuntimeError("mode=predict needs a trained checkpoint: pass ckpt_path=<run>/checkpoints/best-*.ckpt")

    # ---- forward ---------------------------------------------------------------------------
    def _scale_target(self, v: torch.Tensor) -> torch.Tensor:
        return (v - self.value_mean[0]) / self.value_std[0]

    def _unscale_target(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.value_std[0] + self.value_mean[0]

    def forward(self, batch: dict[str, torch.Tensor], return_attention: bool = False):
        """Forecast in scaled units [B, H] (and attention maps per layer if asked)."""
        if not self._ready[0]:
            raise RuntimeError("ClinicalForecaster has no scaling yet: call model.set_scaler(datamodule.scaler) after "
                               "datamodule.setup('fit') (the module's setup for fit does this)")
        x = (batch["x"] - self.value_mean) / self.value_std
        net = self.net if return_attention else self._steps_net()  # attention maps: the explicit path
        return net(x, batch["observed"], batch["present"], batch["minute"], return_attention=return_attention)

    def compile_plan(self) -> CompilePlan:
        return CompilePlan(True, "fixed-size windows: static shapes", mode=CUDA_GRAPHS)

    def attention_kernel(self) -> str:
        return "sdpa (F.scaled_dot_product_attention; attention-map plots take the explicit path)"

    def _steps_net(self):
        """self.net, or its compiled view when compile is on: built at first use and kept out of the module
        tree, so checkpoints hold plain keys."""
        if not self.compile_decision.on:
            return self.net
        if "_compiled_net" not in self.__dict__:
            self.__dict__["_compiled_net"] = compiled(self.net, self.compile_decision)
        return self.__dict__["_compiled_net"]

    def baselines(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Persistence and ridge forecasts in the data's units, [B, H] each."""
        x = fill_missing(batch["x"][..., 0], batch["present"])
        last = x[:, -1:]
        out = {"persistence": last.expand(-1, self.hparams.prediction_horizon)}
        if self.hparams.baselines:
            xs = self._scale_target(x)
            feats = torch.cat([xs[:, -self.ridge_lags:] - xs[:, -1:], torch.ones_like(last)], 1)
            out["ridge"] = self._unscale_target(xs[:, -1:] + feats @ self.ridge_weight)
        return out

    def forecast(self, batch: dict[str, torch.Tensor], return_attention: bool = False) -> dict[str, Any]:
        """Model and baseline forecasts in the data's units (for plots and evaluation)."""
        result = self(batch, return_attention)
        pred, maps = result if return_attention else (result, None)
        out = {"model": self._unscale_target(pred), **self.baselines(batch)}
        if maps is not None:
            out["attention"] = maps
        return out

    def _loss(self, pred_scaled: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = self._scale_target(y)
        kind = self.hparams.loss
        if kind == "mse":
            return F.mse_loss(pred_scaled, target)
        if kind == "mae":
            return F.l1_loss(pred_scaled, target)
        return F.huber_loss(pred_scaled, target, delta=self.hparams.huber_delta)

    # ---- steps -----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        loss = self._loss(self(batch), batch["y"])
        self.log_train_step({"train/loss": loss}, batch_size=batch["y"].shape[0])
        return loss

    def _evaluate(self, batch, metrics: dict[str, ForecastMetrics]) -> torch.Tensor:
        pred = self(batch)
        loss = self._loss(pred, batch["y"])
        forecasts = {"model": self._unscale_target(pred), **self.baselines(batch)}
        for name, metric in metrics.items():
            if name in forecasts and (name != "ridge" or self._ready[1]):
                metric.update(forecasts[name], batch["y"])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._evaluate(batch, self.val_metrics)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["y"].shape[0])

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def _log_metrics(self, prefix: str, metrics) -> None:
        logs = {}
        for name, metric in metrics.items():
            if name == "ridge" and not self._ready[1]:
                metric.reset()
                continue
            if not metric.update_called:
                continue
            key = prefix if name == "model" else f"{prefix}/{name}"
            logs.update(flatten(metric.compute(), key, self.hparams.interval_minutes, self.hparams.report_minutes,
                                per_step=name == "model"))
            metric.reset()
        main = logs.pop(f"{prefix}/rmse", None)
        if main is not None:
            self.log(f"{prefix}/rmse", main, prog_bar=True)
        if logs:
            self.log_dict(logs)

    def on_test_epoch_start(self) -> None:
        h, c = self.hparams.prediction_horizon, self.hparams.clarke
        self.test_metrics = {name: {k: ForecastMetrics(h, c).to(self.device) for k in ("model", "persistence", "ridge")}
                             for name in self.test_names}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.test_names[dataloader_idx] if dataloader_idx < len(self.test_names) else f"test{dataloader_idx}"
        if name not in self.test_metrics:
            h, c = self.hparams.prediction_horizon, self.hparams.clarke
            self.test_metrics[name] = {k: ForecastMetrics(h, c).to(self.device) for k in ("model", "persistence", "ridge")}
        self._evaluate(batch, self.test_metrics[name])

    def on_test_epoch_end(self) -> None:
        for name, metrics in self.test_metrics.items():
            self._log_metrics("test" if name == "test" else f"test_{name}", metrics)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        forecasts = self.forecast(batch)
        return {"subject": list(batch["subject"]), "origin": batch["origin"].cpu(),
                "prediction": forecasts["model"].float().cpu(), "actual": batch["y"].float().cpu(),
                "persistence": forecasts["persistence"].float().cpu()}

    def save_predictions(self, predictions: list[dict], output_dir: Path) -> Path:
        """predictions.csv: one row per subject, forecast origin and horizon step."""
        import pandas as pd

        H = self.hparams.prediction_horizon
        step = pd.Timedelta(minutes=self.hparams.interval_minutes)
        subjects = [s for p in predictions for s in p["subject"]]
        origin = pd.to_datetime(torch.cat([p["origin"] for p in predictions]).numpy(), unit="ns")
        pred = torch.cat([p["prediction"] for p in predictions]).numpy()
        actual = torch.cat([p["actual"] for p in predictions]).numpy()
        n = len(subjects)
        steps = np.tile(np.arange(1, H + 1), n)
        frame = pd.DataFrame({
            "id": np.repeat(subjects, H),
            "origin_time": np.repeat(origin, H),
            "time": np.repeat(origin, H) + steps * step,
            "step": steps,
            "minutes_ahead": steps * self.hparams.interval_minutes,
            "prediction": pred.reshape(-1).round(2),
            "actual": actual.reshape(-1),
        })
        path = Path(output_dir) / "predictions.csv"
        frame.to_csv(path, index=False)
        log.info("Wrote %d forecasts of %d windows to %s", len(frame), n, path)
        print(f"Forecasts: {path}")
        return path
