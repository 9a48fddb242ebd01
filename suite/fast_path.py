"""The fast path on a GPU, applied and printed once when a run starts: one line per setting, with why.

Each setting is on by default where it keeps results, and each has its switch: fused optimizers
(`optimizer.fused`), TF32 matmuls (`cuda.matmul_precision`), bf16 autocast (`precision=auto`),
channels-last weights for convolutional networks (`channels_last=auto`), the attention kernel (the
task's own setting: legal_bert's `model.attn_implementation`), pinned, persistent and prefetching
loaders (`loader.*`, with `num_workers` > 0). torch.compile (`model.compile=auto`) is decided by the
module at setup, when it knows its data (common/fast_path.py), and printed then; the run hands it
where compiled kernels are kept (`paths.compile_cache_dir`).
"""
from __future__ import annotations

import logging

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger("run")

DEVICE_TYPES = {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}


def device_type(cfg: DictConfig) -> str:
    """The torch device type of the resolved accelerator (cfg.trainer.accelerator)."""
    return DEVICE_TYPES.get(str(cfg.trainer.accelerator).lower(), "cpu")


def channels_last(setting, device: str, model) -> tuple[bool, str]:
    """(on, why) for channels_last=auto|true|false: auto takes NHWC weights for a convolutional
    network (the module's `convolutional`) on a GPU, where tensor-core convolutions want them."""
    if setting is True or setting is False:
        return setting, f"channels_last={str(setting).lower()}"
    what = getattr(model, "convolutional", None)
    if device != "cuda":
        return False, device
    if what:
        return True, f"{what} is convolutional"
    return False, getattr(model, "channels_last_note", None) or "no convolutional network"


def prepare(cfg: DictConfig, model):
    """Apply what is decided before the Trainer exists, hand the module its compile context, print the lines."""
    device = device_type(cfg)
    nhwc, why = channels_last(cfg.get("channels_last", "auto"), device, model)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights go NHWC; others are untouched
    if hasattr(model, "compile_cache_dir"):
        model.compile_cache_dir = cfg.paths.get("compile_cache_dir")
        if cfg.get("mode") == "tune_batch_size":  # each trial a new batch shape: a compile (and CUDA graphs) each
            model.compile_refusal = "mode=tune_batch_size: every trial is a new batch shape"
    if rank_zero_only.rank == 0:
        for line in lines(cfg, model, device, f"channels-last: {'on' if nhwc else 'off'} ({why})"):
            log.info(line)
    return model


def lines(cfg: DictConfig, model, device: str, channels_line: str) -> list[str]:
    optimizer = cfg.get("optimizer") or {}
    name = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or "none"
    fused = bool(optimizer.get("fused"))
    matmul = str((cfg.get("cuda") or {}).get("matmul_precision", "high"))
    tf32 = (f"{'on' if matmul != 'highest' else 'off'} (cuda.matmul_precision={matmul})" if device == "cuda"
            else f"off ({device})")
    precision = f"{cfg.trainer.precision}" + (" (precision=auto)" if str(cfg.get("precision")) == "auto" else "")
    attention = getattr(model, "attention_kernel", lambda: None)()
    loader = cfg.get("loader") or {}
    workers = int(loader.get("num_workers") or 0)
    pinned = "off (cpu)" if device == "cpu" else "on" if loader.get("pin_memory") else "off (loader.pin_memory)"
    persistent = "on" if loader.get("persistent_workers") else "off"
    loaders = (f"{workers} workers, persistent {persistent}, prefetch {loader.get('prefetch_factor')}, "
               f"pinned memory {pinned}") if workers else "in the main process (num_workers=0)"
    return [f"fused optimizer: {'on' if fused else 'off'} ({name}, optimizer.fused={str(fused).lower()})",
            f"TF32 matmuls: {tf32}",
            f"precision: {precision}",
            channels_line,
            f"attention: {attention or 'none in this network'}",
            f"loaders: {loaders}"]
