"""What `python run.py` does, top to bottom.

1. take the config (from the checkpoint when evaluating one), check the run dir, save the config
2. seed, resolve device and precision, build datamodule, model, callbacks, loggers, trainer
3. run the mode: fit (then test on the best checkpoint), validate, test, predict, tune_lr, tune_batch_size
4. always close the loggers; return the optimized metric for sweepers
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from common.lightning_private import before_the_launcher_kills
from datamodules.base import BaseDataModule
from suite import hardware, rundir, summary, sweeps, tuning
from suite.checkpoint import (check_fits, check_init_from, config_for_checkpoint, config_from_checkpoint,
                              load_init_from)
from suite.config_checks import check_arguments, check_monitored_callbacks, check_settings, instantiate_section
from suite.loggers import build_loggers, close_loggers
from suite.sweeps import is_multirun as _is_multirun

log = logging.getLogger("run")


def run(cfg: DictConfig, extra_callbacks: list | None = None) -> float | None:
    """run.py's flow; `extra_callbacks` join the configured ones (the benchmark's timer uses this)."""
    check_settings(cfg)
    try:
        return sweeps.value_for_sweeper(cfg, _run(cfg, list(extra_callbacks or [])))
    except Exception as err:
        if _peer_failure(err):
            failure = PeerRankFailed(_peer_failure_message(cfg, err))
            failure.__cause__ = err  # the error log shows the backend's traceback beneath
            _write_error_log(cfg, failure)
            raise failure from err
        _write_error_log(cfg, err)
        if _is_multirun() and cfg.get("ignore_failures"):
            return sweeps.failed_trial(err)  # NaN, or under Optuna a TrialFailed: the sweep goes on either way
        raise


def _run(cfg: DictConfig, extra_callbacks: list) -> float | None:
    started = time.monotonic()
    if cfg.mode in rundir.EVAL_MODES and cfg.ckpt_path:
        cfg = config_from_checkpoint(cfg)
    check_arguments(cfg, "data", "model")
    if _needs_own_process(cfg):
        return _run_job_in_subprocess(cfg)
    init_from = check_init_from(cfg)  # before prepare: a refused run writes nothing
    resume_ckpt = rundir.prepare(cfg)
    _log_before_the_launcher_kills(cfg)
    if cfg.print_config and rank_zero_only.rank == 0:  # always saved in the run dir as config.yaml
        summary.print_config_tree(cfg)

    L.seed_everything(cfg.seed, workers=True)
    _resolve_hardware(cfg)

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
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)  # 4-D weights go NHWC; others are untouched
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
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        return metric
    if mode in ("validate", "test"):
        getattr(trainer, mode)(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        return _metric(trainer, cfg.get("optimized_metric"))
    if mode == "predict":
        predictions = trainer.predict(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        if hasattr(model, "save_predictions") and trainer.is_global_zero:
            model.save_predictions(predictions, Path(cfg.paths.output_dir))
        return None
    return tuning.tune(cfg, trainer, model, datamodule)


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


# ---- hardware and strategies ----------------------------------------------------------------------
def _resolve_hardware(cfg: DictConfig) -> None:
    with open_dict(cfg):
        accelerator = hardware.resolve_accelerator(cfg.trainer.accelerator)
        cfg.trainer.accelerator = accelerator
        cfg.trainer.precision = hardware.resolve_precision(cfg.trainer.precision, accelerator)
        if cfg.get("mode") == "predict" and _several_devices(cfg):
            # Under DDP each rank predicts its own share and only rank 0 writes: outputs would be
            # silently partial. Prediction is cheap next to training, so it takes one device.
            if _launched_externally():
                raise ValueError("mode=predict writes one set of outputs from one process; start it with plain "
                                 "`python run.py` (not torchrun/srun), it uses one device")
            log.info("mode=predict runs on one device (trainer.devices=%s ignored)", cfg.trainer.devices)
            cfg.trainer.devices, cfg.trainer.num_nodes = 1, 1
        if cfg.trainer.get("strategy") not in (None, "auto") and cfg.trainer.devices == 1 and (
                accelerator == "cpu" or cfg.get("mode") == "predict"):
            cfg.trainer.strategy = "auto"
        if accelerator == "gpu" and _jobs_side_by_side():
            job, gpus = HydraConfig.get().job.num, torch.cuda.device_count()
            devices = gpu_of_parallel_job(cfg.trainer.devices, job, gpus)
            if devices != cfg.trainer.devices:
                log.info("Sweep jobs run side by side: job %s trains on GPU %s of %d", job, devices[0], gpus)
                cfg.trainer.devices = devices
    if accelerator == "gpu":
        cuda = cfg.get("cuda") or {}
        torch.set_float32_matmul_precision(cuda.get("matmul_precision", "high"))
        torch.backends.cudnn.benchmark = bool(cuda.get("cudnn_benchmark", True)) and not cfg.deterministic


def gpu_of_parallel_job(devices, job: int, gpus: int):
    """The device a one-device job takes when sweep jobs run side by side: job n on GPU n mod gpus,
    so they spread over the machine instead of all landing on the first GPU. Anything but
    `devices=1` is the user's own choice and kept."""
    return [job % gpus] if devices == 1 and gpus > 1 else devices


def _jobs_side_by_side() -> bool:
    """A multirun job of Hydra's joblib launcher, which runs several jobs at once on this machine."""
    return _is_multirun() and "joblib" in str(HydraConfig.get().launcher.get("_target_", "")).lower()


def _several_devices(cfg: DictConfig) -> bool:
    devices = cfg.trainer.devices
    listed = not isinstance(devices, (int, str)) and len(devices) > 1
    return devices == -1 or str(devices) == "auto" or (isinstance(devices, int) and devices > 1) or listed \
        or int(cfg.trainer.get("num_nodes") or 1) > 1


def _needs_own_process(cfg: DictConfig) -> bool:
    """A multirun job on several devices. Lightning's DDP launcher re-executes the command line,
    which inside a sweep would start the whole sweep again in every rank; so such a job runs as a
    plain single run in a fresh process, and Lightning launches its ranks from that."""
    return _is_multirun() and _several_devices(cfg) and not _launched_externally()


def _run_job_in_subprocess(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    out = Path(cfg.paths.output_dir)
    keep_hydra = [o for o in hydra_cfg.overrides.hydra if o.split("=")[0] in ("hydra.searchpath", "hydra.job.env_set")]
    command = [sys.executable, str(Path(sys.argv[0]).resolve()), *hydra_cfg.overrides.task, *keep_hydra,
               f"run_name={out.parent.name}", f"hydra.run.dir={out}"]
    log.info("Job %s uses %s devices: running it as its own process: %s", hydra_cfg.job.num, cfg.trainer.devices,
             " ".join(command))
    result = subprocess.run(command, cwd=hydra_cfg.runtime.cwd)
    if result.returncode != 0:
        raise RuntimeError(f"job {hydra_cfg.job.num} exited with code {result.returncode}; see {out / 'run.log'}")
    result_file = out / "result.json"
    return json.loads(result_file.read_text())["value"] if result_file.is_file() else None


def _launched_externally() -> bool:
    """True under torchrun or SLURM, which start every rank themselves."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


class PeerRankFailed(RuntimeError):
    """Another rank of a distributed job died, and this one stopped instead of waiting for it."""


# What the collective backends say when the other end of a collective has gone away.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "NCCL error", "ncclRemoteError", "Socket Timeout", "DistNetworkError", "DistBackendError")


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _peer_failure(err: BaseException) -> bool:
    if _world_size() < 2:
        return False
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in PEER_GONE)


def _peer_failure_message(cfg: DictConfig, cause: BaseException | str) -> str:
    rank, world = rank_zero_only.rank, _world_size()
    last = rundir.last_checkpoint(cfg)
    detail = f"Backend message: {str(cause).strip()[:300]}" if isinstance(cause, BaseException) else cause
    return (f"Rank {rank} of {world}: another rank of this job stopped (killed, crashed or out of memory) during a "
            f"collective operation, so this rank stops too instead of waiting for it. "
            f"{'The newest checkpoint is ' + str(last) if last.is_file() else 'No checkpoint was written yet'}; "
            f"the failing rank's own output says why it stopped. {detail}")


def _log_before_the_launcher_kills(cfg: DictConfig) -> None:
    """Lightning's launcher watches the other ranks from rank 0 and, when one dies, SIGKILLs the
    whole job: under NCCL rank 0 could otherwise wait in a collective for ever. The kill leaves
    rank 0 no time for its own error, so the watcher writes it first (error.log, and the log)."""
    def report(failed: list[tuple[int, int]]) -> None:
        dead = ", ".join(f"rank {rank} exited with code {code}" for rank, code in failed)
        _write_error_log(cfg, PeerRankFailed(_peer_failure_message(cfg, f"Launcher: {dead}.")))

    before_the_launcher_kills(report)


def _write_error_log(cfg: DictConfig, err: BaseException) -> None:
    try:
        out = Path(cfg.paths.output_dir)
    except Exception:
        return
    if isinstance(err, rundir.RunDirTaken):
        return  # that dir holds another run: the refusal goes to the console only
    rank = rank_zero_only.rank
    if (rank != 0 and not isinstance(err, PeerRankFailed)) or not out.exists():
        return  # a peer failure may leave rank 0 dead: every surviving rank writes its own log
    last = rundir.last_checkpoint(cfg)
    how = (f"Resume with: python run.py model={cfg.task_name} resume=true run_name={cfg.run_name}"
           if last.is_file() else "No checkpoint was written, so there is nothing to resume.")
    path = out / ("error.log" if rank == 0 else f"error-rank{rank}.log")
    path.write_text(f"{type(err).__name__}: {err}\n\n{how}\n\n" + "".join(traceback.format_exception(err)))
    log.error("Run failed: %s: %s. Traceback in %s. %s", type(err).__name__, err, path, how)

