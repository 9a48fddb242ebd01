"""`python -m bench --explain` says how much host time each callback's per-step hooks take (issue 27's eager gap)."""
from __future__ import annotations

import time

import pytest

from tests.conftest import TEST_CONF
from tests.test_bench import bench


@pytest.fixture
def harness(monkeypatch):
    from bench import harness, rows

    monkeypatch.setattr(rows, "SEARCH_PATH", TEST_CONF)  # the tests' tiny task
    return harness


def test_explain_names_the_host_time_each_callbacks_per_step_hooks_take(tmp_path, harness, monkeypatch):
    """Issue 27's eager gap is the suite's callbacks: each row says which of them the host waits on, a step, without
    the noise of comparing runs with one removed. A callback made 30 ms slower a step shows that much, first."""
    from callbacks.nan_recovery import NaNRecovery

    real = NaNRecovery.on_before_optimizer_step
    monkeypatch.setattr(NaNRecovery, "on_before_optimizer_step",
                        lambda self, *a: (time.sleep(0.03), real(self, *a)) and None)
    rows = bench(harness, tmp_path, "--impls", "suite_eager,plain", "--explain")
    timed = next(r for r in rows if r["key"] == "hooks-timed")
    hooks = timed["hook_ms"]
    assert next(iter(hooks)) == "NaNRecovery" and 30 <= hooks["NaNRecovery"] < 45, hooks
    assert "TrainingMonitor" in hooks and hooks["TrainingMonitor"] < 5 and "WindowTimer" not in hooks
    # the rows compared with the plain loop do not pay for timing ~100 hook calls a step; the plain loop has none
    assert not any("hook_ms" in r for r in rows if r["key"] in ("suite_eager", "plain")), rows
    assert "tiny / suite, hooks timed: per-step hooks' host ms a step: NaNRecovery 3" in (tmp_path / "results.md").read_text()


def test_the_fetch_profiler_times_hooks_only_when_asked():
    from bench.timing import FetchProfiler

    for asked in (False, True):
        profiler = FetchProfiler(time_hooks=asked)
        for action in ("[Callback]NaNRecovery.on_before_optimizer_step", "[_TrainingEpochLoop].train_dataloader_next"):
            with profiler.profile(action):
                time.sleep(0.002)
        assert profiler.total >= 0.002 and bool(profiler.hooks) == asked, (asked, profiler.hooks)


def test_a_hooks_profiler_action_names_its_callback_or_module_and_nothing_else_does():
    from bench.timing import hook_owner

    assert hook_owner("[Callback]NaNRecovery.on_before_optimizer_step") == "NaNRecovery"
    assert hook_owner("[Callback]ModelCheckpoint{'monitor': 'val/loss', 'dirpath': '/a/b.c'}.on_train_batch_end") \
        == "ModelCheckpoint"
    assert hook_owner("[LightningModule]NerfModule.on_train_batch_start") == "NerfModule"
    assert hook_owner("[Callback]NaNRecovery.on_validation_end") is None  # not a per-step hook
    assert hook_owner("[_TrainingEpochLoop].train_dataloader_next") is None
