"""What a job of a sweep (`python run.py -m ...`) hands its sweeper when it fails.

Hydra's basic sweeper (grids) runs every job of a batch, then raises the first failure, and ignores returned
values: with `ignore_failures=false` the jobs after a failed one are refused at once (`stop_if_a_job_failed`),
and with `ignore_failures=true` a failed job returns NaN. Optuna's sweeper tells Optuna a job that
raised as a failed trial, and goes on while the share of failed trials in a batch stays within
`hydra.sweeper.max_failure_rate` (the searches in conf/hparams_search/ set it from
`ignore_failures`); a NaN it would instead try to record as the trial's value, which Optuna
refuses, and the whole search ended. So under Optuna a failed job raises, and so does a job whose
metric is missing or not finite.

The jobs of one sweep share one sweep dir even when they run in other processes (joblib, SLURM):
the run name it is named after is cached in the config (suite/resolvers.py), and Hydra hands that
cache from the launching process to every job.
"""
from __future__ import annotations

import logging
import math

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("run")


class TrialFailed(RuntimeError):
    """A trial that Optuna records as failed: its job raised, or has no metric Optuna can take as a value."""


class SweepStopped(RuntimeError):
    """A job not run because an earlier job of its sweep failed (ignore_failures=false)."""


# The first failed job of this process's sweep. Hydra's launchers run every job before raising the first
# failure; this ends the sweep at it instead. Jobs running beside it (joblib) or on a cluster still finish.
_first_failure: str | None = None


def stop_if_a_job_failed(cfg: DictConfig) -> None:
    """Refuse to start a job of a sweep whose earlier job failed, naming that job (ignore_failures=false)."""
    if _first_failure is not None and is_multirun() and not cfg.get("ignore_failures"):
        message = f"job {HydraConfig.get().job.num} not run: {_first_failure}, and ignore_failures=false ends the sweep there"
        log.error(message)  # the launcher reports only the first failure
        raise SweepStopped(message)


def record_failure(err: BaseException) -> None:
    global _first_failure
    if _first_failure is None and is_multirun() and not isinstance(err, SweepStopped):
        _first_failure = f"job {HydraConfig.get().job.num} of this sweep failed ({type(err).__name__}: {err})"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweeper_records_failures() -> bool:
    return is_multirun() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()


def value_for_sweeper(cfg: DictConfig, value: float | None) -> float | None:
    if _sweeper_records_failures() and (value is None or not math.isfinite(value)):
        raise TrialFailed(f"optimized_metric {cfg.get('optimized_metric')} is {value}, which Optuna cannot record "
                          "as a trial's value: the trial counts as failed")
    return value


def failed_trial(err: BaseException) -> float:
    """A job that failed under ignore_failures=true: NaN for the basic sweeper; under Optuna a TrialFailed
    naming `err`, which the sweeper records as a failed trial. Either way the sweep goes on."""
    log.error("Trial failed and ignore_failures=true, so the sweep goes on: %s", err)
    if not _sweeper_records_failures():
        return float("nan")
    rate = HydraConfig.get().sweeper.get("max_failure_rate", 0.0)
    if rate < 1.0:
        log.warning("hydra.sweeper.max_failure_rate=%s: a batch of trials with more failures than that ends the "
                    "search; set it to 1.0 to go on whatever fails (conf/hparams_search/ does with ignore_failures)",
                    rate)
    # A plain exception of ours: a job's own error need not pickle, and joblib's workers send this back.
    raise TrialFailed(f"{type(err).__name__}: {err}") from err


def jobs_side_by_side() -> bool:
    """A multirun job of Hydra's joblib launcher, which runs several jobs at once on this machine."""
    return is_multirun() and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower()
