"""Turn `device=auto|cuda|cpu|mps`, `precision=auto|...` and the device count into Trainer arguments.

Asking for a GPU on a machine without one is not an error: the run continues on CPU and says
so in one line, so the same command works on a laptop and on a GPU node.
"""
from __future__ import annotations

import logging
import os

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from suite import sweeps

log = logging.getLogger(__name__)

VALID_DEVICES = ("auto", "cuda", "gpu", "cpu", "mps")


def resolve_accelerator(device: str) -> str:
    device = str(device).lower()
    if device not in VALID_DEVICES:
        raise ValueError(f"device={device!r} is not valid; choose one of {', '.join(VALID_DEVICES)}")
    if device in ("auto", "cuda", "gpu"):
        if torch.cuda.is_available():
            return "gpu"
        log.warning("No CUDA GPU found: training on CPU with full precision.")
        return "cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        log.warning("MPS is not available: training on CPU with full precision.")
        return "cpu"
    return device


def resolve_precision(precision: str, accelerator: str) -> str:
    precision = str(precision)
    if precision != "auto":
        if accelerator == "cpu" and precision.startswith("16"):
            log.warning("precision=%s is not supported on CPU; using 32-true.", precision)
            return "32-true"
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def resolve_hardware(cfg: DictConfig) -> None:
    """Accelerator, precision, devices and the CUDA math settings, written into cfg.trainer."""
    with open_dict(cfg):
        accelerator = resolve_accelerator(cfg.trainer.accelerator)
        cfg.trainer.accelerator = accelerator
        cfg.trainer.precision = resolve_precision(cfg.trainer.precision, accelerator)
        if cfg.get("mode") == "predict" and several_devices(cfg):
            # Under DDP each rank predicts its own share and only rank 0 writes: outputs would be
            # silently partial. Prediction is cheap next to training, so it takes one device.
            if launched_externally():
                raise ValueError("mode=predict writes one set of outputs from one process; start it with plain "
                                 "`python run.py` (not torchrun/srun), it uses one device")
            log.info("mode=predict runs on one device (trainer.devices=%s ignored)", cfg.trainer.devices)
            cfg.trainer.devices, cfg.trainer.num_nodes = 1, 1
        if cfg.trainer.get("strategy") not in (None, "auto") and cfg.trainer.devices == 1 and (
                accelerator == "cpu" or cfg.get("mode") == "predict"):
            cfg.trainer.strategy = "auto"
        if accelerator == "gpu" and sweeps.jobs_side_by_side():
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


def several_devices(cfg: DictConfig) -> bool:
    devices = cfg.trainer.devices
    listed = not isinstance(devices, (int, str)) and len(devices) > 1
    return devices == -1 or str(devices) == "auto" or (isinstance(devices, int) and devices > 1) or listed \
        or int(cfg.trainer.get("num_nodes") or 1) > 1


def launched_externally() -> bool:
    """True under torchrun or SLURM, which start every rank themselves."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
