"""Compose the config `python run.py <overrides>` would get, outside the command line.

Used by the tests and the benchmark to drive `suite.train.run` in-process with every artefact
under one output dir. `checkpoint_task` is shared with run.py: both compose an evaluated
checkpoint's command line against the checkpoint's own task.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, open_dict

import suite.resolvers  # noqa: F401
from suite.checkpoint import stored_task

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
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides + checkpoint_task(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or root / "run")
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def checkpoint_task(args: Sequence[str]) -> list[str]:
    """`["model=<task>"]` for a command that evaluates a checkpoint (mode=validate|test|predict with
    ckpt_path=...) and chooses no task (model= or experiment=): composed against the default task, the
    checkpoint's own task's settings (nerf's data.path_frames=2) would not exist yet. The stored task
    config still wins over the task's files, then the command's overrides (config_from_checkpoint).
    [] for any other command, or when the checkpoint's task is unknown or has no config here."""
    parser, given, search = OverridesParser.create(), {}, [CONF]
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # Hydra's own flags and their values
            continue
        try:
            override = parser.parse_override(arg)
            given[override.key_or_group] = override.value()
        except OverrideParseException:  # Hydra names a malformed override itself
            continue
    for entry in given.get("hydra.searchpath") or []:
        if isinstance(entry, str) and entry.startswith("file://"):
            search.append(Path(entry[len("file://"):]))
    ckpt = given.get("ckpt_path")
    if given.get("mode") not in EVAL_MODES or not isinstance(ckpt, str) or given.keys() & {"model", "experiment"}:
        return []
    task = stored_task(ckpt)
    if not task or not any((folder / "model" / f"{task}.yaml").is_file() for folder in search):
        return []
    return [f"model={task}"]
