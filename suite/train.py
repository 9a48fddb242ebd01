"""What `python run.py` does, top to bottom.

1. take the config (from the checkpoint when evaluating one), check the run dir, save the config
2. seed, resolve device and precision, build datamodule, model, callbacks, loggers, trainer
3. run the mode: fit (then test the best checkpoint, or the final weights where validation is the test data), validate, test, predict, tune_lr, tune_batch_size
4. always close the loggers; return the optimized metric for sweepers
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from common.task_data import task_data_of
from datamodules import workers
from datamodules.base import BaseDataModule
from suite import fast_path, hardware, jobs, rundir, summary, sweeps, tuning
from suite.checkpoint import (
    check_fits,
    check_init_from,
    config_for_checkpoint,
    config_from_checkpoint,
    load_init_from,
)
from suite.config_checks import (
    check_applicable,
    check_arguments,
    check_monitored_callbacks,
    check_settings,
    instantiate_section,
)
from suite.failures import (
    PeerRankFailed,
    is_peer_failure,
    log_before_the_launcher_kills,
    peer_failure_message,
    write_error_log,
)
from suite.loggers import build_loggers, close_loggers

log = logging.getLogger("run")


def run(cfg: DictConfig, extra_callbacks: list | None = None) -> float | None:
    """run.py's flow; `extra_callbacks` join the configured ones (the benchmark's timer uses this)."""
    check_settings(cfg)
    sweeps.stop_if_a_job_failed(cfg)
    try:
        return sweeps.value_for_sweeper(cfg, _run(cfg, list(extra_callbacks or [])))
    except Exception as err:
        sweeps.record_failure(err)
        if is_peer_failure(err):
            failure = PeerRankFailed(peer_failure_message(cfg, err))
            failure.__cause__ = err  # the error log shows the backend's traceback beneath
            write_error_log(cfg, failure)
            raise failure from err
        write_error_log(cfg, err)
        if sweeps.is_multirun() and cfg.get("ignore_failures"):
            return sweeps.failed_trial(err)  # NaN, or under Optuna a TrialFailed: the sweep goes on either way
        raise
    finally:  # loader workers ignore SIGTERM: a failed job's would hold the exit, or the sweep's next job
        workers.stop_all()


def _run(cfg: DictConfig, extra_callbacks: list) -> float | None:
    started = time.monotonic()
    if cfg.mode in rundir.EVAL_MODES and cfg.ckpt_path:
        cfg = config_from_checkpoint(cfg)
    check_arguments(cfg, "data", "model")
    check_applicable(cfg)
    if jobs.needs_own_process(cfg):
        return jobs.run_job_in_subprocess(cfg)
    init_from = check_init_from(cfg)  # before prepare: a refused run writes nothing
    resume_ckpt = rundir.prepare(cfg)
    log_before_the_launcher_kills(cfg)
    if cfg.print_config and rank_zero_only.rank == 0:  # always saved in the run dir as config.yaml
        summary.print_config_tree(cfg)

    L.seed_everything(cfg.seed, workers=True)
    hardware.resolve_hardware(cfg)

    datamodule = instantiate_section(cfg, "data")
    if not isinstance(datamodule, BaseDataModule):  # the suite and the module read what only it declares
        raise TypeError(f"data._target_={cfg.data._target_} builds a {type(datamodule).__name__}, which does not "
                        "derive from datamodules.base.BaseDataModule (see docs/ADDING_A_TASK.md)")
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model = instantiate_section(cfg, "model", optimizer=optimizer, scheduler=scheduler)
    check_fits(model, resume_ckpt or (cfg.ckpt_path if cfg.mode in rundir.EVAL_MODES else None), cfg)
    if init_from and not resume_ckpt:  # a SLURM requeue of an init_from run resumes its own checkpoint instead
        load_init_from(model, init_from, cfg)
    model.run_config = config_for_checkpoint(cfg)
    model = fast_path.prepare(cfg, model)  # channels-last, the compile cache; one start-up line per setting
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    callbacks += extra_callbacks
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    check_monitored_callbacks(cfg, trainer, model)
    _log_derived(cfg, trainer, datamodule, model)

    status = "failed"
    try:
        logged: dict[str, float] = {}
        metric = _dispatch(cfg, trainer, model, datamodule, resume_ckpt, logged)
        status = "success"
        if trainer.is_global_zero:
            logged.update(_scalars(trainer.callback_metrics))
            (Path(cfg.paths.output_dir) / "result.json").write_text(json.dumps(
                {"optimized_metric": cfg.get("optimized_metric"), "value": metric, "metrics": logged}, indent=1) + "\n")
            summary.print_summary(cfg, trainer, time.monotonic() - started)
        return metric
    finally:
        close_loggers(trainer, status)


def _scalars(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


def _dispatch(cfg, trainer, model, datamodule, resume_ckpt, logged: dict[str, float]) -> float | None:
    """Runs the mode; `logged` collects the fit's final metrics, which the test after it would reset."""
    mode = cfg.mode
    if mode == "fit":
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_ckpt, weights_only=True)
        # the best checkpoint's score: that checkpoint is the one tested and kept, not the last epoch's weights
        metric = summary.best_value(trainer, cfg.get("optimized_metric"))
        metric = _metric(trainer, cfg.get("optimized_metric")) if metric is None else metric
        logged.update(_scalars(trainer.callback_metrics))
        if is_overridden("test_dataloader", datamodule) and not trainer.interrupted:
            trainer.test(model, datamodule=datamodule, ckpt_path=_tested_checkpoint(trainer, datamodule),
                         weights_only=True)
        return metric
    if mode in ("validate", "test"):
        getattr(trainer, mode)(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        name = cfg.get("optimized_metric")
        return _metric(trainer, summary.test_metric(name) if name and mode == "test" else name)
    if mode == "predict":
        predictions = trainer.predict(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        if hasattr(model, "save_predictions") and trainer.is_global_zero:
            model.save_predictions(predictions, Path(cfg.paths.output_dir))
        return None
    return tuning.tune(cfg, trainer, model, datamodule)


def _tested_checkpoint(trainer: L.Trainer, datamodule) -> str | None:
    """The best checkpoint, or None (the final weights, in memory) where the data has no split apart from its
    test data to validate on: there the best checkpoint was chosen on the test data, and its score would flatter."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and task_data_of(datamodule).validation_is_test:
        if trainer.is_global_zero:
            log.info("test: the final weights; the best checkpoint (%s) was chosen on these very examples, as the "
                     "data has no validation split of its own", Path(best).name)
        return None
    return best or None


def _metric(trainer: L.Trainer, name: str | None) -> float | None:
    if not name:
        return None
    value = trainer.callback_metrics.get(name)
    if value is None:
        log.warning("optimized_metric '%s' was not logged; logged: %s", name, sorted(trainer.callback_metrics))
        return None
    return float(value)


def _log_derived(cfg: DictConfig, trainer: L.Trainer, datamodule, model) -> None:
    """The numbers that follow from the settings, printed once (nanoGPT style)."""
    if not trainer.is_global_zero:
        return
    datamodule.trainer = trainer  # Lightning attaches it at fit; the batch split needs the world size now
    per_device = datamodule.per_device_batch_size
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = {
        "run dir": cfg.paths.output_dir,
        "accelerator / devices / precision": f"{trainer.accelerator.__class__.__name__} / {trainer.world_size} / {trainer.precision}",
        "parameters (trainable)": f"{params:,} ({trainable:,})",
        "batch per device / global (x accumulation)":
            f"{per_device} / {per_device * trainer.world_size * trainer.accumulate_grad_batches}",
    }
    for k, v in lines.items():
        log.info("%s: %s", k, v)
