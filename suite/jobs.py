"""A sweep's job that trains on several devices runs as its own process (see needs_own_process)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from suite.hardware import launched_externally, several_devices
from suite.sweeps import is_multirun

log = logging.getLogger("run")


def needs_own_process(cfg: DictConfig) -> bool:
    """A multirun job on several devices. Lightning's DDP launcher re-executes the command line,
    which inside a sweep would start the whole sweep again in every rank; so such a job runs as a
    plain single run in a fresh process, and Lightning launches its ranks from that."""
    return is_multirun() and several_devices(cfg) and not launched_externally()


def run_job_in_subprocess(cfg: DictConfig) -> float | None:
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
