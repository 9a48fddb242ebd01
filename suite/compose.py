"""Compose the config `python run.py <overrides>` would get, outside the command line.

Used by the tests and the benchmark to drive `suite.train.run` in-process with every artefact
under one output dir. `checkpoint_task` is shared with run.py: both compose an evaluated
checkpoint's command line against the checkpoint's own task.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, open_dict

import suite.resolvers  # noqa: F401
from suite.checkpoint import stored_task
from suite.config_checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EVAL_MODES = ("validate", "test", "predict")


def compose_config(root: Path, *overrides: str, search_path: Path | None = None,
                   output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    base = [f"paths.root_dir={root}"]
    if search_path is not None:
        base.append(f"hydra.searchpath=[file://{search_path}]")
    overrides = base + list(overrides)
    moved = moved_setting(overrides + checkpoint_task(overrides))
    if moved:
        raise ConfigError(moved)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides + checkpoint_task(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or root / "run")
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _parsed(args: Sequence[str]) -> list:
    parser, parsed = OverridesParser.create(), []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # Hydra's own flags and their values
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except OverrideParseException:  # Hydra names a malformed override itself
            continue
    return parsed


def _search_folders(given: dict) -> list[Path]:
    search = [CONF]
    for entry in given.get("hydra.searchpath") or []:
        if isinstance(entry, str) and entry.startswith("file://"):
            search.append(Path(entry[len("file://"):]))
    return search


def _config_file(search: list[Path], group: str, name: str) -> dict:
    for folder in search:
        path = folder / group / f"{name}.yaml"
        if path.is_file():
            return yaml.safe_load(path.read_text()) or {}
    return {}


def _net_group(search: list[Path], task_file: dict) -> tuple[str, dict]:
    """The config group that gives model.net in the task file's defaults (nerf: `- /nerf_net: mlp`) and the
    chosen network config: the first such default that is a network config (has a `_target_`); ("", {}) if none."""
    for entry in task_file.get("defaults") or []:
        if isinstance(entry, dict):
            for group, name in entry.items():
                if group.startswith("/") and isinstance(name, str):
                    chosen = _config_file(search, group.lstrip("/"), name)
                    if "_target_" in chosen:
                        return group.lstrip("/"), chosen
    return "", {}


def _group_option(search: list[Path], group: str, name: str) -> str | None:
    """conf/<group>/<name>.yaml as written in messages, if one of the search folders has it."""
    for folder in search:
        if (folder / group / f"{name}.yaml").is_file():
            return f"conf/{group}/{name}.yaml"
    return None


def moved_setting(args: Sequence[str]) -> str | None:
    """The error for a network setting given by its key from before model.net (`model.d_model=64`,
    where the task's model config now has `model.net.d_model`); None when no override does that.
    Hydra's own refusal would only say the key is not in the config."""
    parsed = _parsed(args)
    candidates = [o for o in parsed if re.fullmatch(r"model\.\w+", o.key_or_group) and not o.is_add()
                  and not o.is_delete() and o.package is None]
    if not candidates:
        return None
    given = {o.key_or_group: o.value() for o in parsed}
    search = _search_folders(given)
    task = given.get("model")
    if not isinstance(task, str) and isinstance(given.get("experiment"), str):
        for entry in _config_file(search, "experiment", given["experiment"]).get("defaults") or []:
            if isinstance(entry, dict) and "override /model" in entry:
                task = entry["override /model"]
    if not isinstance(task, str):
        task = next((e["model"] for e in _config_file(search, "", "config").get("defaults") or []
                     if isinstance(e, dict) and "model" in e), None)
    task_file = _config_file(search, "model", str(task))
    model = task_file.get("model") or {}
    group, net_from_group = _net_group(search, task_file)
    net = model.get("net") if isinstance(model.get("net"), dict) else net_from_group
    for override in candidates:
        name = override.key_or_group.split(".", 1)[1]
        value = override.input_line.split("=", 1)[1]
        if group and name in ("field", "net") and (search_file := _group_option(search, group, value)):
            # the network is a choice of config group, not a key (`model.field=hashgrid` as issues spell it)
            return (f"{override.key_or_group}={value}: the network is chosen with the {group} group; "
                    f"use {group}={value} ({search_file})")
        if name not in model and name in net:
            return (f"{override.key_or_group} is now model.net.{name}: the network's settings are under "
                    f"model.net (conf/model/{task}.yaml). Use model.net.{name}={value}")
    return None


def checkpoint_task(args: Sequence[str]) -> list[str]:
    """`["model=<task>"]` for a command that evaluates a checkpoint (mode=validate|test|predict with
    ckpt_path=...) and chooses no task (model= or experiment=): composed against the default task, the
    checkpoint's own task's settings (nerf's data.path_frames=2) would not exist yet. The stored task
    config still wins over the task's files, then the command's overrides (config_from_checkpoint).
    [] for any other command, or when the checkpoint's task is unknown or has no config here."""
    given = {o.key_or_group: o.value() for o in _parsed(args)}
    search = _search_folders(given)
    ckpt = given.get("ckpt_path")
    if given.get("mode") not in EVAL_MODES or not isinstance(ckpt, str) or given.keys() & {"model", "experiment"}:
        return []
    task = stored_task(ckpt)
    if not task or not any((folder / "model" / f"{task}.yaml").is_file() for folder in search):
        return []
    return [f"model={task}"]
