"""One way to turn settings into plain Python values: OmegaConf containers, mappings and tuples become
dicts and lists (and paths strings), so they pickle into checkpoints loaded with weights_only=True,
hash stably, and compare equal however they were given."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def to_plain(value: Any, resolve: bool = True) -> Any:
    """`value` as plain dicts, lists, strings and numbers; `resolve=False` keeps ${...} interpolations."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=resolve)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, resolve) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, resolve) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
