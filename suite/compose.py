"""Compose the config `python run.py <overrides>` would get, outside the command line.

Used by the tests and the benchmark to drive `suite.train.run` in-process with every artefact
under one output dir.
"""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import suite.resolvers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(root: Path, *overrides: str, search_path: Path | None = None,
                   output_dir: Path | None = None) -> DictConfig:
    GlobalHydra.instance().clear()
    base = [f"paths.root_dir={root}"]
    if search_path is not None:
        base.append(f"hydra.searchpath=[file://{search_path}]")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=base + list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir or root / "run")
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg
