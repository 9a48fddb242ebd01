"""Every task config runs end to end through run.py's flow on CPU (one batch of each stage)."""
from __future__ import annotations

import pytest

from suite.train import run
from tests.test_config import TASKS


@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_fast_dev_run(make_config, task):
    run(make_config(f"model={task}", "debug=fast_dev_run"))


def test_bench_harness_runs_on_cpu(tmp_path, monkeypatch):
    """`make bench` on CPU: the same code as on a GPU, tiny, checked for working, not for its numbers."""
    from bench import harness
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    rows = harness.main(["--tasks", "tiny", "--warmup", "1", "--steps", "2", "--windows", "2", "--out", str(tmp_path)])
    assert {r["impl"] for r in rows} == {"suite", "plain"}
    assert all(r["items_per_sec"] > 0 and r["median_step_ms"] > 0 for r in rows)
    assert (tmp_path / "results.json").is_file() and "| tiny | suite |" in (tmp_path / "results.md").read_text()
