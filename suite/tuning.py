"""mode=tune_lr and mode=tune_batch_size: Lightning's tuners on the run's task, model and data.

Each prints its suggestion with the override that applies it and writes it to `tuning.json` in the
run dir; the learning-rate finder also plots its loss curve there (`lr_finder.png`). The tuners run
their own short fit loop before any fit-start hook, so what a module fits from the data (scalers,
heads, label counts) is built in its `setup`.

The batch-size finder doubles what a task's training batch is made of: `batch_size` by default, or
the datamodule setting its `batch_setting` names (nerf: `num_rays`, the rays of one batch). Where a
mode cannot apply, it stops with one line saying why (`TuningNotApplicable`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig

log = logging.getLogger("run")

MODES = ("tune_lr", "tune_batch_size")


class TuningNotApplicable(ValueError):
    """This tuner cannot measure this run as configured; the message says why, in one line."""


def tune(cfg: DictConfig, trainer, model, datamodule) -> float | None:
    """Run the mode's tuner; return its suggestion (what a sweeper and result.json get)."""
    why = refusal(cfg, trainer, datamodule)
    if why:
        raise TuningNotApplicable(why)
    settings = dict(cfg.get("tune") or {})
    out = Path(cfg.paths.output_dir)
    if cfg.mode == "tune_lr":
        return _learning_rate(trainer, model, datamodule, settings, out)
    return _batch_size(trainer, model, datamodule, settings, out)


def refusal(cfg: DictConfig, trainer, datamodule) -> str | None:
    mode = cfg.mode
    if trainer.fast_dev_run:
        return (f"mode={mode} measures many steps and debug=fast_dev_run runs one batch (Lightning skips its tuners "
                "then): use debug=limit, or no debug config")
    if cfg.get("ckpt_path"):
        return (f"mode={mode} reads no ckpt_path={cfg.ckpt_path} (that resumes a fit's whole state): drop it, or pass "
                "init_from=<ckpt> to tune from a checkpoint's weights")
    if mode == "tune_batch_size" and not isinstance(trainer.strategy, SingleDeviceStrategy):
        return (f"mode=tune_batch_size runs on one device (Lightning's finder cannot use "
                f"{type(trainer.strategy).__name__}): pass trainer.devices=1 trainer.strategy=auto; the size it "
                "finds is per device")
    if mode == "tune_batch_size" and batch_setting(datamodule) is None:
        return f"mode=tune_batch_size: {type(datamodule).__name__} has no batch setting to scale"
    return None


def batch_setting(datamodule) -> str | None:
    """The datamodule attribute (or hyperparameter) a training batch's size comes from: the one its
    `batch_setting` declares (datamodules.base.BaseDataModule), when it has a value."""
    name = datamodule.batch_setting
    return name if name is None or _current(datamodule, name) is not None else None


def override_for(name: str) -> str:
    return "batch_size" if name == "batch_size" else f"data.{name}"


def _current(datamodule, name: str) -> int | None:
    value = getattr(datamodule, name, None)
    if value is None:
        value = (getattr(datamodule, "hparams", None) or {}).get(name)
    return int(value) if value is not None else None


def _learning_rate(trainer, model, datamodule, settings: dict, out: Path) -> float | None:
    from lightning.pytorch.tuner import Tuner

    steps = int(settings.get("lr_steps", 100))
    low, high = float(settings.get("lr_min", 1e-8)), float(settings.get("lr_max", 1.0))
    every, epochs = trainer.check_val_every_n_epoch, trainer.fit_loop.max_epochs
    if not isinstance(trainer.val_check_interval, int):
        # The finder reads training losses only; on a small dataset validation would run every few of its steps.
        trainer.check_val_every_n_epoch = 10 ** 9
    # Its steps, not max_epochs x the batches of an epoch (debug=limit's 2 x 4), end the sweep: an epoch has a
    # batch at least, so `steps` epochs suffice, and the count stays finite for schedules sized from it
    trainer.fit_loop.max_epochs = max(epochs, steps) if epochs not in (None, -1) else epochs
    try:
        # update_attr=False: the lr lives in the optimizer config, not on the module
        finder = Tuner(trainer).lr_find(model, datamodule=datamodule, min_lr=low, max_lr=high, num_training=steps,
                                        update_attr=False)
    finally:
        trainer.check_val_every_n_epoch, trainer.fit_loop.max_epochs = every, epochs
    # Lightning skips the first 10 of its default 100 points, where the loss is still noise; as many in proportion
    suggestion = finder.suggestion(skip_begin=max(1, steps // 10)) if finder is not None else None
    if not trainer.is_global_zero:
        return suggestion
    plot = out / "lr_finder.png"
    figure = finder.plot(suggest=False)  # suggest=True would redo the suggestion with Lightning's 10-point skip
    if suggestion is not None:
        at = finder.results["lr"].index(suggestion)
        figure.axes[0].plot(suggestion, finder.results["loss"][at], marker="o", markersize=10, color="red")
        figure.axes[0].set_title(f"suggested lr {suggestion:.3g}")
    figure.savefig(plot)
    import matplotlib.pyplot as plt

    plt.close(figure)
    _save(out, {"mode": "tune_lr", "suggestion": suggestion,
                "use": f"optimizer.lr={suggestion:.3g}" if suggestion is not None else None,
                "plot": plot.name, "lr_min": low, "lr_max": high, "steps": steps,
                "lr": [float(v) for v in finder.results["lr"]], "loss": [float(v) for v in finder.results["loss"]]})
    ran, reached = len(finder.results["lr"]), max(finder.results["lr"], default=low)
    if ran < steps:  # Lightning stops the sweep once the loss passes 4x its lowest
        log.info("The learning-rate sweep stopped after %d of its %d steps, at lr %.3g: the loss diverged", ran,
                 steps, reached)
    if suggestion is None:
        log.info("No learning-rate suggestion: the loss never fell steadily between lr %.3g and %.3g over %d "
                 "steps. Loss curve: %s", low, reached, ran, plot)
    else:
        log.info("Suggested learning rate: %.3g (use optimizer.lr=%.3g). Loss curve: %s; saved in %s", suggestion,
                 suggestion, plot, out / "tuning.json")
    return suggestion


def _batch_size(trainer, model, datamodule, settings: dict, out: Path) -> float | None:
    from lightning.pytorch.tuner import Tuner

    name = batch_setting(datamodule)
    unit = getattr(model, "throughput_unit", "samples")
    start = _current(datamodule, name)
    # From the configured size, not Lightning's 2: a batch of rays is thousands, and each trial costs steps.
    size = Tuner(trainer).scale_batch_size(
        model, datamodule=datamodule, mode="power", batch_arg_name=name, init_val=start,
        steps_per_trial=int(settings.get("steps_per_trial", 3)), max_trials=int(settings.get("max_trials", 25)),
        max_val=int(settings.get("max_batch_size", 8192)))
    if not trainer.is_global_zero or not size:
        return float(size) if size else None
    use = f"{override_for(name)}={size}"
    device = trainer.strategy.root_device
    _save(out, {"mode": "tune_batch_size", "suggestion": size, "unit": unit, "use": use, "started_at": start,
                "device": str(device)})
    note = ("" if device.type == "cuda" else f"; on {device.type.upper()} memory does not run out as on a GPU: the "
            "search stopped at tune.max_batch_size, tune.max_trials or the data's size")
    log.info("Largest batch that fits: %d %s (use %s)%s. Saved in %s", size, unit, use, note, out / "tuning.json")
    return float(size)


def _save(out: Path, result: dict) -> None:
    (out / "tuning.json").write_text(json.dumps(result, indent=1) + "\n")
