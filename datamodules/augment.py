"""`data.augment`, the one augmentation setting of every task that has one: a mapping with `enabled`
and the task's own knobs (conf/data/<task>.yaml lists them, docs/tasks/<task>.md says what they do).

Augmentations are drawn in the training dataset or collator with the global torch RNG: loader workers
reseed it per batch (datamodules/workers.py) and the main process's is checkpointed, so a resumed run
draws what the uninterrupted one drew. Validation, test and predict data are never augmented.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def augment_settings(augment: Mapping[str, Any] | bool | None, defaults: Mapping[str, Any], task: str) -> dict:
    """`data.augment` merged over the task's defaults (off unless `enabled`); a knob the task does not
    have is an error naming the ones it has, never silently ignored."""
    given = {"enabled": augment} if isinstance(augment, bool) else dict(augment or {})
    known = ["enabled", *defaults]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"data.augment: {task} has no augmentation setting {', '.join(map(repr, unknown))}; "
                         f"its settings are {', '.join(known)}")
    settings = {"enabled": False, **defaults, **given}
    if not isinstance(settings["enabled"], bool):
        raise ValueError(f"data.augment.enabled={settings['enabled']!r}: expected true or false")
    return settings


def non_negative(settings: Mapping[str, Any], *keys: str, at_most: float | None = None) -> None:
    """Refuse a negative (or too large) augmentation strength, naming its key."""
    for key in keys:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                at_most is not None and value > at_most):
            bound = f" and <= {at_most}" if at_most is not None else ""
            raise ValueError(f"data.augment.{key}={value!r}: expected a number >= 0{bound}")
