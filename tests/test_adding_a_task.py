"""docs/ADDING_A_TASK.md's task outside the repository, built from the page itself and trained by the
suite as run.py runs it: a sixth task needs no file of the repository changed, and its module receives
what its datamodule declares (TaskData) through the suite."""
from __future__ import annotations

import re
import sys

import pytest
import torch

from common.task_data import TaskData
from suite.compose import compose_config
from suite.train import run
from tests.conftest import ROOT

FILE_BLOCK = re.compile(r"\*\*`([^`]+)`\*\*\n```\w*\n(.*?)```", re.DOTALL)


def example_files() -> dict[str, str]:
    """{relative path: content} of every file the page's example gives (a bold path above a code block)."""
    return dict(FILE_BLOCK.findall((ROOT / "docs" / "ADDING_A_TASK.md").read_text()))


def test_the_documented_sixth_task_trains_through_the_suite_from_its_own_folder(tmp_path, monkeypatch):
    files = example_files()
    assert set(files) == {"my_task/data.py", "my_task/module.py", "conf/model/my_task.yaml", "conf/data/my_task.yaml"}
    folder = tmp_path / "elsewhere"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    assert not (ROOT / "conf" / "model" / "my_task.yaml").exists() and not (ROOT / "my_task").exists()
    # what `PYTHONPATH=<folder> python run.py hydra.searchpath=[file://<folder>/conf] model=my_task` does,
    # in this process: run.py hands the composed config to suite.train.run
    monkeypatch.syspath_prepend(str(folder))
    try:
        cfg = compose_config(tmp_path, "model=my_task", "max_epochs=1", "logger=csv", "device=cpu", "num_workers=0",
                             "print_config=false", f"paths.data_dir={tmp_path / 'data'}", search_path=folder / "conf")
        run(cfg)
    finally:
        for name in [m for m in sys.modules if m == "my_task" or m.startswith("my_task.")]:
            del sys.modules[name]
    run_dir = tmp_path / "run"
    assert "val/loss" in (run_dir / "csv" / "metrics.csv").read_text()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    # bind_data took the training split's scaling, which the datamodule declared: x is drawn around 10, spread 2
    assert 9.0 < float(state["x_mean"]) < 11.0 and 1.5 < float(state["x_std"]) < 2.5


def test_a_module_says_what_it_needs_when_the_datamodule_is_not_the_suites():
    from types import SimpleNamespace

    import lightning as L

    from tests.tiny_task import TinyDataModule, TinyModule

    module = TinyModule()
    module.trainer = SimpleNamespace(datamodule=L.LightningDataModule())
    with pytest.raises(TypeError, match="LightningDataModule is not a suite datamodule: derive it from "
                                        "datamodules.base.BaseDataModule"):
        module.setup("fit")
    data = TinyDataModule({"batch_size": 4})
    module.trainer = SimpleNamespace(datamodule=data)
    module.setup("fit")
    assert module.task_data.train_set is data.train_set and module.task_data.scaler is None


def test_task_data_is_frozen_and_keeps_names_as_tuples():
    data = TaskData(label_names=["a", "b"], class_names=["x"], test_set_names=["ood"])
    assert data.label_names == ("a", "b") and data.class_names == ("x",) and data.num_classes == 1
    assert data.test_set_names == ("ood",) and TaskData().label_names is None and TaskData().num_classes == 0
    with pytest.raises(AttributeError):
        data.label_names = ("c",)
