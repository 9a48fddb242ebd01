"""Config values of the wrong type or range stop the run before anything is built, naming the key,
what it expects and where the value came from (the user's override, or a config file).

`check_settings` covers the global settings of conf/config.yaml; `check_arguments` checks the values
of `data` and `model` against their constructors' type annotations; `instantiate_section` builds
one and names the key when the constructor itself refuses a value; `check_applicable` refuses an override
of a setting the chosen configuration would ignore; `check_monitored_callbacks`
refuses a checkpoint that monitors a metric of a callback that is off.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from common.config import to_plain
from lightning_modules.base import BaseTaskModule
from suite.hardware import VALID_DEVICES

MODES = ("fit", "validate", "test", "predict", "tune_lr", "tune_batch_size")
PRECISIONS = ("auto", "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")


class ConfigError(ValueError):
    """A config value of the wrong type or range; the message names the key."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key: (what it expects, test). Keys absent from a config are skipped.
SETTINGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "seed": ("an integer (or null for a random seed)", lambda v: v is None or _int(v)),
    "max_epochs": ("an integer >= -1 (-1: no limit)", lambda v: v is None or (_int(v) and v >= -1)),
    "batch_size": ("a positive integer", lambda v: _int(v) and v > 0),
    "num_workers": ("an integer >= 0", lambda v: _int(v) and v >= 0),
    "loader.prefetch_factor": ("a positive integer or null", lambda v: v is None or (_int(v) and v > 0)),
    "loader.passes_per_epoch": ("a positive integer", lambda v: _int(v) and v > 0),
    "gradient_clip_val": ("a number >= 0 or null", lambda v: v is None or (_number(v) and v >= 0)),
    "deterministic": ("true, false or warn", lambda v: isinstance(v, bool) or v == "warn"),
    "ckpt_path": ("a checkpoint path or null", lambda v: v is None or isinstance(v, (str, os.PathLike))),
    "init_from": ("a checkpoint path or null", lambda v: v is None or isinstance(v, (str, os.PathLike))),
    **{key: ("a number > 0", lambda v: _number(v) and v > 0) for key in ("tune.lr_min", "tune.lr_max")},
    **{key: ("a positive integer", lambda v: _int(v) and v > 0) for key in (
        "tune.lr_steps", "tune.steps_per_trial", "tune.max_trials", "tune.max_batch_size")},
    **{key: ("true or false", lambda v: isinstance(v, bool)) for key in (
        "batch_size_is_global", "loader.pin_memory", "loader.persistent_workers", "resume",
        "ignore_failures", "soup", "print_config", "cuda.cudnn_benchmark")},
    **{key: ("auto, true or false", lambda v: isinstance(v, bool) or v == "auto") for key in (
        "channels_last", "model.compile")},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "device": VALID_DEVICES,
    "precision": PRECISIONS,
    "cuda.matmul_precision": ("highest", "high", "medium"),
}
_ABSENT = object()


def check_settings(cfg: DictConfig) -> None:
    """Refuse a global setting of the wrong type or range, naming it."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and (str(value).lower() if key == "device" else str(value)) not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)} ({_source(key)})")
    for key, (expected, ok) in SETTINGS.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is not _ABSENT and not ok(value):
            raise ConfigError(f"{key}={value!r}: expected {expected} ({_source(key)})")


def instantiate_section(cfg: DictConfig, section: str, **kwargs: Any) -> Any:
    """`instantiate(cfg.<section>)`, naming `<section>.<key>` when the constructor refuses a value."""
    node = cfg[section]
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, (TypeError, ValueError)) or isinstance(cause, ConfigError):
            raise
        message = str(cause)
        named = [key for key in _keys(node, section)
                 if re.search(rf"\b{re.escape(key.rsplit('.', 1)[1])}\b", message)]
        where = ", ".join(named) if named and f"{section}." not in message else section
        raise ConfigError(f"{where}: {message} (building {node.get('_target_')})") from cause


def check_monitored_callbacks(cfg: DictConfig, trainer, model) -> None:
    """Refuse a fit whose checkpoint monitors a metric that a callback logs (the module's
    `callback_metrics`) while that callback is off: it would fail only after the first validation."""
    if cfg.get("mode") in ("validate", "test", "predict") or not trainer.limit_val_batches:
        return  # nothing is monitored without validation
    monitor = getattr(trainer.checkpoint_callback, "monitor", None) or ""
    for key, prefixes in type(model).callback_metrics.items():
        node = (cfg.get("callbacks") or {}).get(key)
        if monitor.startswith(tuple(prefixes)) and not (node and "_target_" in node):
            raise ConfigError(f"The checkpoint monitors {monitor}, which callbacks.{key} logs, but that callback is "
                              "off: set monitor.metric=val/loss monitor.mode=min, or keep the callback")


def _nested(node: DictConfig, key: Any) -> DictConfig | None:
    """`node.<key>` when it is a config of its own (`_target_`), as model.net is."""
    try:
        child = node[key]
    except Exception:  # an unresolvable value: instantiate reports it in its own words
        return None
    return child if isinstance(child, DictConfig) and "_target_" in child else None


def _keys(node: DictConfig, prefix: str) -> list[str]:
    """Every setting's full key under `node`, those of a nested `_target_` config (model.net) included."""
    keys = []
    for k in node:
        if not str(k).startswith("_"):
            child = _nested(node, k)
            keys += _keys(child, f"{prefix}.{k}") if child is not None else [f"{prefix}.{k}"]
    return keys


def check_arguments(cfg: DictConfig, *sections: str) -> None:
    """Each value of `cfg.<section>` against the annotation of the constructor argument it goes to
    (plain types, their unions and Literals; anything else is left to the constructor), and so on
    into a nested `_target_` config such as model.net."""
    for section in sections:
        node = cfg.get(section)
        if isinstance(node, DictConfig) and "_target_" in node:
            _check_against_annotations(node, section)


def check_applicable(cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """Refuse an override (the command line's, or `overrides`) of a model setting the chosen configuration would
    ignore (the model class's `inapplicable_settings`: NeRF's occupancy-grid settings under another renderer),
    instead of running without it. Experiment presets stay: an experiment may prepare a renderer a user picks."""
    unused = inapplicable_settings(cfg)
    typed = command_line_overrides() if overrides is None else parse_overrides(overrides)
    for key, _, line in typed:
        name = model_setting(key)
        if name in unused:
            raise ConfigError(f"model.{name} would be ignored: {unused[name]} (your override {line})")


def model_setting(key: str) -> str | None:
    """The setting of `model` an override's key sets (`model.proposal_net.levels` -> proposal_net), or None."""
    return key.removeprefix("model.").split(".")[0] if key.startswith("model.") else None


def inapplicable_settings(cfg: DictConfig) -> dict[str, str]:
    """{key of cfg.model: why it would go unused}, as its class declares (BaseTaskModule.inapplicable_settings)."""
    node = cfg.get("model")
    if not (isinstance(node, DictConfig) and "_target_" in node):
        return {}
    try:
        model_class = get_object(node._target_)
    except Exception:  # not importable: instantiate says so itself
        return {}
    if not (inspect.isclass(model_class) and issubclass(model_class, BaseTaskModule)):
        return {}
    return model_class.inapplicable_settings(to_plain(node))


def _check_against_annotations(node: DictConfig, section: str) -> None:
    for key in node:
        child = _nested(node, key)
        if child is not None:
            _check_against_annotations(child, f"{section}.{key}")
    target = node._target_
    for name, hint in _annotations(target).items():
        if name not in node:
            continue
        try:
            value = node[name]
            value = to_plain(value)
        except Exception:  # an unresolvable value: instantiate reports it in its own words
            continue
        if _fits(value, hint) is False:
            key = f"{section}.{name}"
            raise ConfigError(f"{key}={value!r}: expected {_describe(hint)} (argument {name} of {target}) "
                              f"({_source(key)})")


def _annotations(target: str) -> dict[str, Any]:
    try:
        obj = get_object(target)
        init = obj.__init__ if inspect.isclass(obj) else obj
        params = inspect.signature(init).parameters
        namespace = vars(sys.modules[init.__module__])
    except Exception:  # not importable or no signature: instantiate says so itself
        return {}
    hints = {}
    for name, param in params.items():
        hint = param.annotation
        if isinstance(hint, str):  # `from __future__ import annotations`
            try:
                hint = eval(hint, namespace)
            except Exception:  # a name only imported for type checkers
                continue
        if hint is not inspect.Parameter.empty:
            hints[name] = hint
    return hints


def _fits(value: Any, hint: Any) -> bool | None:
    """True or False where the hint is one we can judge, else None."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, h) for h in typing.get_args(hint)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _int(value) or (isinstance(value, float) and value.is_integer())
    if hint is float:
        return _number(value)
    if hint is str:
        return True if isinstance(value, str) else (None if _number(value) else False)
    return None


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return re.sub(r"\btyping\.|<class '(\w+)'>", lambda m: m.group(1) or "", str(hint)).replace("NoneType", "None")


def command_line_overrides() -> list[tuple[str, Any, str]]:
    """(key or group, value, as typed) for each override of this command's config."""
    return parse_overrides(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else []


def parse_overrides(lines: list[str]) -> list[tuple[str, Any, str]]:
    """(key or group, value, as typed) for each of these Hydra overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(lines)
    return [(o.key_or_group, o.value(), o.input_line) for o in parsed if not o.is_delete() and o.package is None]


def _source(key: str) -> str:
    typed = [line for k, _, line in command_line_overrides() if k == key]
    if typed:
        return f"your override {typed[-1]}"
    return "set in conf/: config.yaml, or the model, experiment or debug config chosen"
