"""Checkpoint files: atomic writes; the run config each one carries; and checks that a checkpoint
given as input is a usable file of this run's task and fits its model, with errors naming both."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import get_object
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from common.files import atomic_write
from datamodules.builtin import upgrade_stored_data_config
from suite.config_checks import command_line_overrides

if TYPE_CHECKING:
    from lightning_modules.base import BaseTaskModule

log = logging.getLogger(__name__)

# Sections a checkpoint brings along when it is evaluated: what defines the task and its weights.
TASK_SECTIONS = ("task_name", "monitor", "model", "data", "callbacks", "optimizer", "scheduler")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to `<name>.tmp-<pid>`, then rename: a process killed while saving never leaves a
    truncated file where a good checkpoint was, and the next start removes what it left
    (`common.files.remove_stale_temporaries`, called by callbacks.resume). Local files are written here directly: Lightning's own save stages them
    in the system temp folder, where a kill left them behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code runs); raise naming the file if it is unusable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"Checkpoint {path} is corrupt or not a PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"Checkpoint {path} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def config_for_checkpoint(cfg: DictConfig) -> dict:
    """Unresolved, so paths re-resolve on the machine that loads the checkpoint."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return container


def config_from_checkpoint(cfg: DictConfig) -> DictConfig:
    """Evaluate a checkpoint with the task config it was trained with, plus this command's overrides.
    A task chosen on the command line that is not the checkpoint's is refused, never quietly replaced."""
    path = Path(str(cfg.ckpt_path)).expanduser()
    stored = check_checkpoint(path).get("run_config")
    if stored is None:
        log.warning("%s carries no run config; using this command's model and data configs.", path)
        return cfg
    overrides = command_line_overrides()
    chosen = [typed for key, _, typed in overrides if key in ("model", "experiment")]
    if chosen and stored.get("task_name") not in (None, cfg.get("task_name")):
        raise ValueError(f"{path} is a checkpoint of task '{stored['task_name']}', but this command chose "
                         f"{' '.join(chosen)} (task '{cfg.task_name}'). Drop {chosen[0].split('=')[0]}=... to evaluate "
                         f"it with the config stored in it, or pass a checkpoint of task '{cfg.task_name}'.")
    with open_dict(cfg):
        for key in TASK_SECTIONS:
            if key in stored:
                cfg[key] = stored[key]
        if "data" in stored and _has_cache(stored["data"]):  # from before built-in data moved to the suite's cache
            cache = f"{cfg.paths.data_dir}/{stored.get('task_name', cfg.task_name)}"
            cfg.data = upgrade_stored_data_config(OmegaConf.to_container(cfg.data), cache)
        for key, value, _ in overrides:
            if key.split(".")[0] in TASK_SECTIONS and "." in key:
                OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def _has_cache(data: dict) -> bool:
    """A datamodule that generates built-in data into a cache; others (the tests' tiny task) take no cache_dir."""
    try:
        return "cache_dir" in inspect.signature(get_object(data["_target_"])).parameters
    except Exception:  # not importable here: building it names the problem
        return True


def stored_task(path: str | Path) -> str | None:
    """The task a checkpoint was trained on (from its stored run config); None when it has none or
    cannot be read (whoever uses the checkpoint then names the problem)."""
    try:
        return (check_checkpoint(path).get("run_config") or {}).get("task_name")
    except (OSError, ValueError, RuntimeError):
        return None


def check_init_from(cfg: DictConfig) -> str | None:
    """`init_from=<ckpt>` starts a fresh fit from a checkpoint's weights only. Refuse it, before
    anything is written, where it would mean something else: with resume=true or ckpt_path (which
    restore all of a run's training state), in an evaluation mode, or with another task's file."""
    given = cfg.get("init_from")
    if not given:
        return None
    if cfg.mode in ("validate", "test", "predict"):
        raise ValueError(f"init_from={given} starts a new training run from a checkpoint's weights, but mode={cfg.mode} "
                         f"evaluates one: pass ckpt_path={given} instead.")
    if cfg.get("resume"):
        raise ValueError(f"init_from={given} starts a fresh run from a checkpoint's weights, and resume=true continues "
                         f"run '{cfg.run_name}' from its own last checkpoint: pass one of them.")
    if cfg.get("ckpt_path"):
        raise ValueError(f"init_from={given} takes a checkpoint's weights only (new optimizer and schedule, step 0), "
                         f"and ckpt_path={cfg.ckpt_path} resumes all of its training state: pass one of them.")
    path = Path(str(given)).expanduser()
    check_task(check_checkpoint(path), path, cfg.task_name)
    return str(path)


def load_init_from(model: BaseTaskModule, path: str | Path, cfg: DictConfig) -> None:
    """Load a checkpoint's weights into a freshly built model, strictly: every weight of the same name
    and shape, or a refusal naming both models. Where the checkpoint has EMA weights (diffusion), they
    are the ones loaded: they are what its evaluation and samples used. Only the weights come along;
    the module's `init_from` tells it which of its data-fitted state to keep (clinical's scaling)."""
    checkpoint = check_checkpoint(path)
    state = {k: v for k, v in checkpoint["state_dict"].items() if k not in model.run_state}
    ema = ((checkpoint.get("callbacks") or {}).get("EMA") or {}).get("shadow")
    if ema:
        for name, value in ema.items():
            key = name.replace("._orig_mod", "").replace("_orig_mod.", "")
            if key in state:
                state[key] = value.to(state[key].dtype)
        log.info("init_from=%s: starting from its EMA weights, as its evaluation and samples did", path)
    checkpoint = {**checkpoint, "state_dict": state}
    model.on_load_checkpoint(checkpoint)  # builds what a checkpoint has and a fresh model builds in setup()
    check_fits(model, path, cfg)
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_from={path} does not fit this run's model (task '{cfg.get('task_name')}'): "
                         f"{err}") from None
    model.init_from = str(path)
    log.info("init_from=%s: weights loaded; optimizer, schedule and step start afresh", path)


def check_task(checkpoint: dict[str, Any], path: str | Path, task_name: str) -> None:
    """Training goes on from a checkpoint only of this run's task."""
    stored = (checkpoint.get("run_config") or {}).get("task_name")
    if stored is not None and stored != task_name:
        raise ValueError(f"{path} is a checkpoint of task '{stored}', but this run trains task '{task_name}'. "
                         f"Pass model={stored} to go on training it, or a checkpoint of task '{task_name}'.")


def check_fits(model: torch.nn.Module, path: str | Path | None, cfg: DictConfig) -> None:
    """Refuse a checkpoint whose weights do not fit this run's model (another architecture), naming
    a weight of each shape and the model settings that differ, once the model's on_load_checkpoint has built
    what the checkpoint has. Keys only one side has are left to Lightning's strict loading: some modules
    build parts in setup()."""
    if not path:
        return
    checkpoint = check_checkpoint(path)
    # first what the module sizes from its data and a checkpoint carries (nerf's `auto` hash tables), as loading will
    model.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})
    theirs = {k: list(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    own = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): list(v.shape) for k, v in model.state_dict().items()}
    differ = [k for k in own if k in theirs and own[k] != theirs[k]]
    if not differ and (theirs.keys() & own.keys() or not theirs or not own):
        return
    stored = checkpoint.get("run_config") or {}
    settings = _differences(stored.get("model"), OmegaConf.to_container(cfg.model, resolve=False), "model")
    if differ:
        what = (f"{len(differ)} weight(s) differ in shape, e.g. {differ[0]} is {theirs[differ[0]]} in the "
                f"checkpoint and {own[differ[0]]} in this run's model")
    else:
        what = "it shares no weight names with this run's model"
    raise ValueError(f"{path} does not fit this run's model: {what} (checkpoint: task '{stored.get('task_name', '?')}'"
                     f"{', ' + settings if settings else ''}; this run: task '{cfg.get('task_name')}'). Pass the model "
                     "settings it was trained with, or another checkpoint")


def _differences(stored: Any, own: Any, prefix: str) -> str:
    if not isinstance(stored, dict) or not isinstance(own, dict):
        return ""
    if isinstance(own.get("net"), dict) and "net" not in stored:  # from before model.net: its settings flat
        stored = {**stored, "net": {k: stored[k] for k in own["net"] if k in stored}}
    keys = [k for k in own if k in stored and not isinstance(own[k], dict) and stored[k] != own[k]]
    found = [f"{prefix}.{k}={stored[k]!r} there and {own[k]!r} here" for k in keys]
    found += [_differences(stored.get(k), own[k], f"{prefix}.{k}") for k in own if isinstance(own[k], dict)]
    return ", ".join(f for f in found if f)

