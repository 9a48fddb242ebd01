"""common/lightning_private.py holds every use of Lightning's private API. When a Lightning release
moves one of those names, or stops calling a private hook the suite overrides, these fail naming it."""
from __future__ import annotations

import importlib
import inspect
import os
import re

import lightning
import pytest
import torch

from common import lightning_private


def _resolve(path: str):
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


@pytest.mark.parametrize("owner,name", lightning_private.PRIVATE_NAMES, ids=lambda v: v.rsplit(".", 1)[-1])
def test_every_private_name_the_suite_uses_still_exists(owner, name):
    obj = _resolve(owner)
    found = hasattr(obj, name) or (inspect.isclass(obj) and any(  # an instance attribute: set in an __init__
        re.search(rf"self\.{name}\b\s*(:[^=]*)?=", source) for source in _sources(obj, "__init__")))
    assert found, (f"Lightning {lightning.__version__} has no {owner}.{name} (tested with "
                   f"{lightning_private.LIGHTNING_TESTED}): update common/lightning_private.py")


def _sources(cls, method: str) -> list[str]:
    """The source of `method` in `cls` and in each base class that defines it."""
    return [inspect.getsource(vars(c)[method]) for c in cls.__mro__[:-1] if method in vars(c)]


def _calls(cls, method: str, name: str) -> None:
    assert any(f".{name}(" in source for source in _sources(cls, method)), (
        f"Lightning {lightning.__version__}'s {cls.__name__}.{method} no longer calls {name}, which "
        f"common/lightning_private.py overrides (tested with {lightning_private.LIGHTNING_TESTED})")


def test_the_private_hooks_the_suite_overrides_are_still_called():
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy

    _calls(FSDPStrategy, "setup", "_setup_model")
    _calls(lightning_private.ChildProcessObserver, "_run", "_terminate_all")
    _calls(lightning_private.ExperimentWriter, "__init__", "_check_log_dir_exists")
    _calls(ModelCheckpoint, "_save_none_monitor_checkpoint", "_save_checkpoint")


def test_private_attributes_read_have_the_meaning_the_suite_expects(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert lightning_private.step_last_saved(ModelCheckpoint()) == 0, "ModelCheckpoint._last_global_step_saved"
    assert list(inspect.signature(ModelCheckpoint._save_none_monitor_checkpoint).parameters) == \
        ["self", "trainer", "monitor_candidates"], "ModelCheckpoint._save_none_monitor_checkpoint"
    observer = lightning_private.ChildProcessObserver(main_pid=os.getpid(), child_processes=[])
    assert observer._child_processes == [], "_ChildProcessObserver._child_processes"
    strategy = lightning_private.FSDPWrapping(activation_checkpointing_policy={torch.nn.Linear})
    assert strategy._activation_checkpointing_kwargs, "FSDPStrategy._activation_checkpointing_kwargs"
    params = list(inspect.signature(lightning_private.ResultCollection.log).parameters)
    assert params[:7] == ["self", "fx", "name", "value", "prog_bar", "logger", "on_step"], "_ResultCollection.log"


def test_the_csv_logger_continues_an_existing_metrics_file(tmp_path):
    logger = lightning_private.AppendingCSVLogger(tmp_path, name="", version="")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    again = lightning_private.AppendingCSVLogger(tmp_path, name="", version="")
    again.log_metrics({"a": 2.0}, step=1)
    again.finalize("success")
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == ["a,step", "1.0,0", "2.0,1"]
