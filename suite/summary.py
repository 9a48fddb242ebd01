"""What a run says besides its progress: the config tree on request (`print_config=true`; it is always
in the run dir as config.yaml) and, at its end, a short summary: the best checkpoint's monitored
metric and step, its path, the run dir and the time taken.

The best checkpoint is also what fit hands a sweeper (`best_value`): it is the one kept (and tested, unless
the validation data is the test data), so a trial whose last epoch fell back is judged by its best.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("run")


@dataclass
class Best:
    metric: str
    score: float
    path: str


def best_checkpoint(trainer, metric: str | None) -> Best | None:
    """The best checkpoint by `metric`, from the checkpoint callback that monitors it (None: no such
    callback, or no validation saved one)."""
    for callback in trainer.checkpoint_callbacks if metric else ():
        if isinstance(callback, ModelCheckpoint) and callback.monitor == metric and callback.best_model_path:
            score = callback.best_model_score
            if score is not None and math.isfinite(float(score)):
                return Best(metric, float(score), callback.best_model_path)
    return None


def best_value(trainer, metric: str | None) -> float | None:
    best = best_checkpoint(trainer, metric)
    return best.score if best is not None else None


def _position(path: str) -> tuple[int | None, int | None]:
    """(global step, epoch) of a checkpoint; mmap reads only what is asked for."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["global_step"]), int(state["epoch"])
    except Exception:  # noqa: BLE001  (the summary never fails a run that worked)
        return None, None


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def test_metric(name: str) -> str:
    """What a test logs for a monitored validation metric: val/psnr -> test/psnr."""
    return "test/" + name.split("/", 1)[-1]


def lines(cfg: DictConfig, trainer, seconds: float) -> list[str]:
    metric = cfg.get("monitor", {}).get("metric")
    out = []
    if cfg.mode == "fit":
        best = best_checkpoint(trainer, metric)
        if best is None:
            out.append(f"best {metric}: none (no validation scored it, or callbacks.model_checkpoint is off)")
        else:
            step, epoch = _position(best.path)
            where = f" at step {step} (epoch {epoch})" if step is not None else ""
            out += [f"best {metric}: {best.score:.6g}{where}", f"best checkpoint: {best.path}"]
            tested = trainer.callback_metrics.get(test_metric(metric)) if trainer.state.fn == "test" else None
            if tested is not None and tested.numel() == 1:  # fit tests the final weights where val is the test data
                whose = "its" if trainer.ckpt_path and Path(trainer.ckpt_path) == Path(best.path) else "the final weights'"
                out.append(f"{whose} {test_metric(metric)}: {float(tested):.6g}")
    elif cfg.mode in ("validate", "test"):
        value = trainer.callback_metrics.get(metric if cfg.mode == "validate" else test_metric(metric))
        if value is not None and value.numel() == 1:
            out.append(f"{cfg.mode} {metric.split('/', 1)[-1]}: {float(value):.6g} ({cfg.ckpt_path})")
    out += [f"run dir: {cfg.paths.output_dir}", f"time: {duration(seconds)}"]
    return out


def print_summary(cfg: DictConfig, trainer, seconds: float) -> None:
    log.info("Summary of %s:\n%s", cfg.mode, "\n".join("  " + line for line in lines(cfg, trainer, seconds)))


def print_config_tree(cfg: DictConfig) -> None:
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    order = ["task_name", "mode", "model", "data", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths"]
    keys = order + [k for k in cfg if k not in order and k != "hydra"]
    for key in keys:
        if key not in cfg:
            continue
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rprint(tree)
