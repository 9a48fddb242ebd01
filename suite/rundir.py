"""Run directories: fresh runs never overwrite, resumed runs continue in place.

Layout of one run, all under `paths.output_dir` = logs/<task>/<run_name>/:
    config.yaml        resolved config of the first launch (config.resume-<n>.yaml for each resume)
    overrides.txt      the command-line overrides, to rerun it
    run.log            everything logged, appended across resumes
    checkpoints/       best-*.ckpt, last.ckpt, periodic checkpoints
    wandb_run_id       so `resume=true` reattaches to the same W&B run
    error.log          traceback and how to resume, when a run fails
"""
from __future__ import annotations

import logging
import os
import pickle
import secrets
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from suite.checkpoint import check_checkpoint, check_task

log = logging.getLogger(__name__)

EVAL_MODES = ("validate", "test", "predict")


def eval_dir(log_dir: str, task: str, run_name: str, mode: str, ckpt_path: str | None) -> str:
    """Where a run writes. Evaluating a checkpoint writes beside the run that produced it."""
    if ckpt_path and mode in EVAL_MODES:
        ckpt = Path(str(ckpt_path)).expanduser().resolve()
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return str(run / f"{mode}_{run_name}")
    return f"{log_dir}/{task}/{run_name}"


def last_checkpoint(cfg: DictConfig) -> Path:
    """What resume=true continues from: the newest by training step of last.ckpt (written at every
    validation and at the end of fit) and the periodic step*.ckpt (written mid-epoch), so a run
    killed after a periodic checkpoint loses nothing that was saved. last.ckpt wins a tie."""
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    found = [p for p in (ckpt_dir / "last.ckpt", *sorted(ckpt_dir.glob("step*.ckpt"))) if p.is_file()]
    if not found:
        return ckpt_dir / "last.ckpt"
    return max(found, key=lambda p: (_global_step(p), p.name == "last.ckpt"))


def _global_step(path: Path) -> int:
    try:  # mmap: only the small metadata is read
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
    except (OSError, RuntimeError, ValueError, AttributeError, pickle.UnpicklingError):
        return -1  # unreadable: chosen only when nothing else exists, then check_checkpoint names it


class RunDirTaken(FileExistsError):
    """A fresh run named after an existing one: refused with nothing written into that run's dir."""


def prepare(cfg: DictConfig) -> str | None:
    """Check the run dir against `resume`, save the config; return the checkpoint to resume from:
    this run's own (resume=true) or, in fit, the `ckpt_path` given."""
    out = Path(cfg.paths.output_dir)
    name = out.name
    given = cfg.get("ckpt_path") if cfg.mode == "fit" else None
    if given and cfg.resume:
        raise ValueError(f"resume=true continues run '{name}' from its own last checkpoint, and ckpt_path={given} "
                         "starts from that file: pass one of them.")
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and last_checkpoint(cfg).is_file()
    if requeued and not cfg.resume:
        log.info("SLURM requeued this job (restart %s): resuming in place.", os.environ["SLURM_RESTART_COUNT"])
        with open_dict(cfg):
            cfg.resume = True
    last = None
    if cfg.resume:
        if cfg.mode != "fit":
            raise ValueError(f"resume=true continues training (mode=fit); got mode={cfg.mode}. Use ckpt_path=... instead.")
        last = last_checkpoint(cfg)
        if not last.is_file():
            siblings = sorted(p.parent.parent.name for p in out.parent.glob("*/checkpoints/last.ckpt"))
            hint = f" Runs of this task with a last.ckpt: {', '.join(siblings[-5:])}." if siblings else ""
            raise FileNotFoundError(
                f"resume=true but {last} does not exist, so run '{name}' cannot be continued. "
                f"Pass run_name=<an earlier run>, or drop resume=true to start fresh.{hint}"
            )
        check_checkpoint(last)
    elif given:
        last = Path(str(given)).expanduser()
        check_task(check_checkpoint(last), last, cfg.task_name)
    config_file = out / "config.yaml"
    if rank_zero_only.rank == 0:
        if config_file.exists() and not cfg.resume:
            _stop_logging_into(out)
            raise RunDirTaken(
                f"{out} already holds run '{name}'. Pass resume=true to continue it, or another run_name; "
                "nothing was overwritten."
            )
        out.mkdir(parents=True, exist_ok=True)
        target = config_file
        if config_file.exists():
            n = len(list(out.glob("config.resume-*.yaml"))) + 1
            target = out / f"config.resume-{n}.yaml"
        OmegaConf.save(cfg, target, resolve=True)
        if HydraConfig.initialized():
            (out / "overrides.txt").open("a").write(" ".join(HydraConfig.get().overrides.task) + "\n")
    return str(last) if last is not None else None


def _stop_logging_into(out: Path) -> None:
    """Hydra's run.log handler points into the refused run's dir: close it, so that nothing of the
    refused run (its error included) lands in the log of the run it must not touch."""
    root, out = logging.getLogger(), out.resolve()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(out):
            root.removeHandler(handler)
            handler.close()


def read_or_create_wandb_id(out: Path) -> str:
    """The W&B run id, written to the run dir as soon as it exists so a resume reattaches to it."""
    id_file = out / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B accepts any short alphanumeric id
    if rank_zero_only.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return run_id
