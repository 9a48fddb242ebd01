"""Every task config runs end to end through run.py's flow on CPU (one batch of each stage)."""
from __future__ import annotations

import pytest

from suite.train import run
from tests.test_config import TASKS

# legal_bert_mlm's whole config is slow on a CPU (a masked-LM head over MiniLM's vocabulary); its adaptation
# story runs in make test (tests/legal_bert/test_adapt.py), this run under make test-all. license_plate's default
# detector takes ~22 s here; its fit-and-predict story runs in make test (tests/license_plate/test_end_to_end.py).
SLOW_TASKS = {"legal_bert_mlm", "license_plate"}


@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_TASKS else t for t in TASKS])
def test_every_task_runs_fast_dev_run(make_config, task, monkeypatch):
    from common.lightning_private import ResultCollection

    # Lightning reads every progress-bar value to the host after each training batch (a GPU sync per
    # step), so per-step values must not be logged with prog_bar=True; callbacks.progress shows them.
    per_step_bar = []
    real_log = ResultCollection.log

    def log(self, fx, name, value, prog_bar=False, *args, **kwargs):
        if prog_bar and kwargs.get("on_step", args[1] if len(args) > 1 else False):
            per_step_bar.append(f"{fx}: {name}")
        return real_log(self, fx, name, value, prog_bar, *args, **kwargs)

    monkeypatch.setattr(ResultCollection, "log", log)
    run(make_config(f"model={task}", "debug=fast_dev_run"))
    assert not per_step_bar, f"logged per step with prog_bar=True: {sorted(set(per_step_bar))}"
