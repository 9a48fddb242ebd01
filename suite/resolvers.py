"""OmegaConf resolvers used by conf/. Registered once, on import."""
from __future__ import annotations

import datetime as _dt
import os

from omegaconf import OmegaConf

_RUN_NAME: str | None = None


def run_name() -> str:
    """A run name unique per process: second-precision timestamp, microseconds and pid.

    Cached so that every interpolation in one process (run dir, W&B name) agrees; two jobs
    started in the same second differ by microseconds and pid.
    """
    global _RUN_NAME
    if _RUN_NAME is None:
        now = _dt.datetime.now()
        _RUN_NAME = _shared_launcher_name(now) or f"{now:%Y-%m-%d_%H-%M-%S}.{now:%f}-{os.getpid()}"
    return _RUN_NAME


def _shared_launcher_name(now: _dt.datetime) -> str | None:
    """Under SLURM or torchrun every rank composes its own config: name the run after what they share."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" in env:
        run_id = env["TORCHELASTIC_RUN_ID"]
        return f"torchrun-{run_id}" if run_id != "none" else f"torchrun-{now:%Y-%m-%d_%H-%M}-{env.get('MASTER_PORT', '')}"
    return None


def required(key: str, what: str = "") -> str:
    """`${suite.required:data.data_dir,'the scene folder'}`: a value the user must give.

    Hydra's `???` merged over a base config's value keeps that value, so an experiment saying
    `data_dir: ???` would silently train on the default data; this fails instead, naming the key."""
    raise ValueError(f"{key} is required here{': ' + what if what else ''}. Pass {key}=<path> on the command line.")


def register() -> None:
    if not OmegaConf.has_resolver("suite.required"):
        OmegaConf.register_new_resolver("suite.required", required)
    if not OmegaConf.has_resolver("suite.run_name"):
        # Cached in the config too: Hydra copies the launching process's cache into every job's
        # config, so sweep jobs in other processes (joblib, SLURM) share its sweep dir and name.
        OmegaConf.register_new_resolver("suite.run_name", run_name, use_cache=True)
    if not OmegaConf.has_resolver("suite.run_dir"):
        from suite.rundir import eval_dir

        OmegaConf.register_new_resolver("suite.run_dir", eval_dir)
    if not OmegaConf.has_resolver("suite.direction"):
        # monitor.mode (max|min) -> Optuna's direction (maximize|minimize)
        OmegaConf.register_new_resolver("suite.direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode])
    if not OmegaConf.has_resolver("suite.eval"):
        # small arithmetic in configs, e.g. ${suite.eval:'${batch_size} * 2'}
        OmegaConf.register_new_resolver("suite.eval", lambda expr: eval(expr, {"__builtins__": {}}, {}))


register()
