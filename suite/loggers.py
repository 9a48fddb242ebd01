"""The run's loggers (conf/logger/): built from the config, closed whatever happens; W&B gets the whole
config and the run's config files, CSV keeps what a resumed run already wrote."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from omegaconf import DictConfig

from common.config import to_plain
from common.lightning_private import AppendingCSVLogger
from suite import rundir

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    out = Path(cfg.paths.output_dir)
    for lg in (cfg.get("logger") or {}).values():
        if not lg or "_target_" not in lg:
            continue
        if lg._target_.endswith("WandbLogger"):
            loggers.append(_wandb_logger(cfg, lg, out))
        else:
            loggers.append(instantiate(lg))
    return loggers


def _wandb_logger(cfg: DictConfig, lg: DictConfig, out: Path):
    offline = lg.get("offline", "auto")
    if offline == "auto":
        offline = not os.environ.get("WANDB_API_KEY")
    os.environ.setdefault("WANDB_DIR", str(out))
    # Offline through wandb's own mode rather than Lightning's `offline`, which refuses log_model:
    # an offline run keeps its checkpoint artifacts too, and `wandb sync` uploads them.
    kwargs = {"id": rundir.read_or_create_wandb_id(out), "offline": False, "resume": "allow",
              **({"mode": "offline"} if offline else {})}
    logger = instantiate(lg, **kwargs)
    if isinstance(logger, WandbLogger):  # set here: instantiate would build every `_target_` in the config
        logger.run_config, logger.run_dir = _resolved(cfg), out
    return logger


def _resolved(cfg: DictConfig) -> dict:
    """Every setting the run was given, resolved; Hydra's own section left out. Key by key on the
    config itself, so resolvers' cached values (the sweep's run name) hold."""
    return {k: to_plain(v) for k, v in cfg.items() if k != "hydra"}


def close_loggers(trainer, status: str) -> None:
    for lg in trainer.loggers:
        try:
            lg.finalize(status)
        except Exception as err:  # closing must never hide the run's own error
            log.warning("Closing logger %s failed: %s", type(lg).__name__, err)
    wandb = sys.modules.get("wandb")  # imported only if a W&B logger ran; an install without it is fine
    try:
        if wandb is not None and wandb.run is not None:
            wandb.finish(exit_code=0 if status == "success" else 1)
    except Exception as err:
        log.warning("wandb.finish failed: %s", err)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger whose W&B run, once started, holds the whole resolved config (every
    group as nested keys, beside the model's hyperparameters that Lightning logs) and has the run
    dir's config.yaml (config.resume-<n>.yaml) and overrides.txt attached, under the run dir's name:
    W&B keeps a config.yaml of its own."""

    run_config: dict | None = None
    run_dir: Path | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        run = super().experiment
        if not self.__dict__.get("_suite_attached"):  # once, when the run has started
            self._suite_attached = True
            self._attach(run)
        return run

    def _attach(self, run) -> None:
        if self.run_config:
            run.config.update(self.run_config, allow_val_change=True)  # a resume may change settings
        if self.run_dir:
            for path in sorted(self.run_dir.glob("config*.yaml")) + sorted(self.run_dir.glob("overrides.txt")):
                run.save(str(path), base_path=str(self.run_dir.parent), policy="now")


class CSVLogger(AppendingCSVLogger):
    """CSVLogger whose metrics.csv survives `resume=true` (new rows are appended)."""
