"""A task's network as a nested config, `model.net`, with its own `_target_`.

The module gets the config (a plain dict, saved with its hyperparameters, so `load_from_checkpoint`
rebuilds the same network) and builds it with what it derives itself: sizes that follow from the
data, and the suite-wide switches such as `model.gradient_checkpointing`. The task's model config
says `_recursive_: false`, so Hydra leaves `model.net` to the module.

Checkpoints from before `model.net` store the network's settings as flat hyperparameters
(`d_model=64` beside the module's own); `network_config` moves them into the config, so they load.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from common.config import to_plain


def network_config(net: Mapping[str, Any] | None, flat: Mapping[str, Any], target: str,
                   moved: tuple[str, ...], owner: str) -> dict[str, Any]:
    """`net` (default: `{"_target_": target}`) as a plain dict, with the settings that the module took
    flat before `model.net` existed (`moved`; old checkpoints, old calls) moved in. Any other
    unexpected argument is refused as Python would."""
    unknown = sorted(set(flat) - set(moved))
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    config = to_plain(net) if net is not None else {"_target_": target}
    if "_target_" not in config:
        raise ValueError(f"model.net needs a _target_ (the network class or builder), e.g. {target}")
    return {**config, **to_plain(dict(flat))}


def build_network(config: Mapping[str, Any], **derived: Any) -> nn.Module:
    """Instantiate `config` with the arguments the module derives (`derived`); those are not set in it.
    The network's own refusal of a value (a TypeError or ValueError) is raised as it is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    clash = sorted(set(config) & set(derived))
    if clash:
        raise ValueError(f"model.net.{clash[0]} is set by the module itself; remove it from model.net")
    try:
        return instantiate(dict(config), **derived, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (TypeError, ValueError)):
            raise err.__cause__ from None
        raise


def network_setting(config: Mapping[str, Any], name: str) -> Any:
    """The value `name` has in the network `config`: as set there, else the default of its `_target_`."""
    if name in config:
        return config[name]
    import inspect

    from hydra.utils import get_object

    return inspect.signature(get_object(config["_target_"])).parameters[name].default
