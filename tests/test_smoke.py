"""Every task config runs end to end through run.py's flow on CPU (one batch of each stage)."""
from __future__ import annotations

import pytest

from suite.train import run
from tests.test_config import TASKS


@pytest.mark.parametrize("task", TASKS)
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


def test_bench_harness_runs_on_cpu(tmp_path, monkeypatch):
    """`make bench` on CPU: the same code as on a GPU, tiny, checked for working, not for its numbers."""
    from bench import harness
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    rows = harness.main(["--tasks", "tiny", "--warmup", "1", "--steps", "2", "--windows", "2", "--out", str(tmp_path)])
    assert {r["impl"] for r in rows} == {"suite", "plain"}
    assert all(r["items_per_sec"] > 0 and r["median_step_ms"] > 0 for r in rows)
    assert (tmp_path / "results.json").is_file() and "| tiny | suite |" in (tmp_path / "results.md").read_text()


def test_rounds_alternate_implementations_and_pool_their_windows(tmp_path, monkeypatch):
    """--rounds 2: suite, plain, suite, plain; each row's median is over both rounds' windows."""
    import statistics

    from bench import harness
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    order = []
    for name in ("measure_suite", "measure_plain"):
        real = getattr(harness, name)
        monkeypatch.setattr(harness, name, lambda root, o, w, _real=real, _name=name: order.append(_name) or _real(root, o, w))
    rows = harness.main(["--tasks", "tiny", "--rounds", "2", "--warmup", "1", "--steps", "1", "--windows", "3",
                         "--out", str(tmp_path)])
    assert order == ["measure_suite", "measure_plain"] * 2
    for row in rows:
        assert row["rounds"] == 2 and len(row["window_ms"]) == 6
        assert row["median_step_ms"] == pytest.approx(statistics.median(row["window_ms"]))
    assert (tmp_path / "tiny" / "suite" / "round2" / "config.yaml").is_file()
    assert "2 alternating rounds" in (tmp_path / "results.md").read_text()
    suite = next(r for r in rows if r["impl"] == "suite")
    assert len(suite["ratio_by_round"]) == 2 and "suite / plain by round" in (tmp_path / "results.md").read_text()


def test_ratio_by_round_pairs_each_round_with_the_plain_loop_of_that_round():
    from bench.harness import ratio_by_round

    suite = [{"items_per_sec": 90.0}, {"error": "boom"}, {"items_per_sec": 120.0}]
    plain = [{"items_per_sec": 100.0}, {"items_per_sec": 100.0}, {"items_per_sec": 100.0}]
    assert ratio_by_round(suite, plain) == pytest.approx([0.9, 1.2])


def test_lightning_row_runs_the_suite_without_callbacks_or_logger(tmp_path, monkeypatch):
    """--impls lightning: Lightning's own loop, so the suite's gap splits into Lightning's and the callbacks'."""
    from omegaconf import OmegaConf

    from bench import harness
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    rows = harness.main(["--tasks", "tiny", "--impls", "suite,lightning,plain", "--warmup", "1", "--steps", "2",
                         "--windows", "1", "--out", str(tmp_path)])
    assert [r["impl"] for r in rows] == ["suite", "lightning", "plain"]
    assert rows[1]["items_per_sec"] > 0 and rows[1]["ratio"] > 0
    bare = OmegaConf.load(tmp_path / "tiny" / "lightning" / "config.yaml")
    full = OmegaConf.load(tmp_path / "tiny" / "suite" / "config.yaml")
    assert not bare.callbacks and not bare.logger and full.callbacks.nan_recovery and full.logger


def test_merged_rounds_take_the_median_of_all_windows_and_keep_failures_visible():
    from bench.timing import merge_rounds

    a = {"window_ms": [10.0, 30.0], "items_per_step": 4, "wait_share": 0.1, "peak_mem_gb": 1.0, "cpu_window_ms": [5, 7]}
    b = {"window_ms": [20.0, 40.0], "items_per_step": 4, "wait_share": 0.3, "peak_mem_gb": 2.0, "cpu_window_ms": [9, 11]}
    merged = merge_rounds([a, b, {"error": "RuntimeError: boom"}])
    assert merged["median_step_ms"] == 25.0 and merged["spread_ms"] == 30.0 and merged["host_cpu_ms"] == 8.0
    assert merged["items_per_sec"] == pytest.approx(4 / 0.025)
    assert merged["wait_share"] == pytest.approx(0.2) and merged["peak_mem_gb"] == 2.0
    assert merged["rounds"] == 2 and merged["error"].startswith("1 of 3 rounds failed: RuntimeError")
    assert merge_rounds([a]) is a


def test_explain_measures_the_suite_without_each_per_step_callback(tmp_path, monkeypatch):
    """--explain: one extra suite row per callback with a per-step hook, and what it costs a step."""
    from bench import harness
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    keys = harness.per_step_callbacks(tmp_path / "c", ["model=tiny", "device=cpu"])
    # checkpointing acts at validation or every N steps through Lightning's own hooks; these run every step
    assert {"nan_recovery", "monitor", "training_curves", "progress_bar"} <= set(keys)
    assert not {"model_checkpoint", "last_checkpoint", "periodic_checkpoint", "random_state"} & set(keys)
    monkeypatch.setattr(harness, "per_step_callbacks", lambda root, overrides: ["nan_recovery", "monitor"])
    rows = harness.main(["--tasks", "tiny", "--impls", "suite,plain", "--explain", "--warmup", "1", "--steps", "2",
                         "--windows", "1", "--out", str(tmp_path)])
    assert [r["impl"] for r in rows] == ["suite", "plain", "suite without nan_recovery", "suite without monitor"]
    full = rows[0]["median_step_ms"]
    assert rows[2]["saved_ms"] == pytest.approx(full - rows[2]["median_step_ms"])
    from omegaconf import OmegaConf

    config = OmegaConf.load(tmp_path / "tiny" / "explain" / "without-monitor" / "config.yaml")
    assert config.callbacks.monitor is None and config.callbacks.nan_recovery is not None
    assert "nan_recovery costs" in (tmp_path / "results.md").read_text()


def test_time_to_quality_runs_each_budget_and_reads_the_test_metric(tmp_path, monkeypatch):
    """`python -m bench.quality`: one run per budget, trainer.max_time set, test metrics in the table."""
    from bench import harness, quality
    from tests.conftest import TEST_CONF

    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    monkeypatch.setattr(quality, "profiles", lambda task: [
        # the experiment's own max_time (nerf's experiments have one) gives way to the budget's
        {"name": "tiny_default", "overrides": ["model=tiny", "device=cpu", "num_workers=0", "max_epochs=2",
                                               "+trainer.max_time=00:00:30:00"],
         "metrics": ["test/loss", "not/logged"], "budgets": [0.02, 1]}])
    rows = quality.main(["--tasks", "tiny", "--out", str(tmp_path)])
    assert [r["budget_min"] for r in rows] == [0.02, 1]
    assert all("error" not in r and r["metrics"]["test/loss"] > 0 and r["metrics"]["not/logged"] is None for r in rows)
    config = (tmp_path / "tiny_default-0.02min" / "config.yaml").read_text()
    assert "max_time: 00:00:00:01" in config
    assert "| tiny | tiny_default | 1 min |" in (tmp_path / "quality.md").read_text()


def test_a_quality_pass_cut_short_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    """A pass killed mid-way (a GPU command's time limit) leaves the rows measured so far on disk."""
    import json

    from bench import quality

    calls = []

    def measure(out, profile, minutes, data_root, extra):
        calls.append(minutes)
        if len(calls) > 1:
            raise KeyboardInterrupt  # what a kill looks like from inside: not an Exception, nothing after runs
        return {"wall_s": 1.0, "test/loss": 0.5}

    monkeypatch.setattr(quality, "measure", measure)
    monkeypatch.setattr(quality, "profiles", lambda task: [{"name": "p", "overrides": [], "metrics": ["test/loss"],
                                                            "budgets": [1, 2]}])
    with pytest.raises(KeyboardInterrupt):
        quality.main(["--tasks", "tiny", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert [(r["budget_min"], r["metrics"]["test/loss"]) for r in rows] == [(1, 0.5)]


def test_peer_row_is_named_and_compared_with_the_suite(tmp_path, monkeypatch):
    """A task's `peer` hook joins the table under its own name, with suite / peer beside it."""
    import sys
    import types

    from bench import harness
    from common.timing import Windows
    from tests.conftest import TEST_CONF

    def peer(task_root, overrides, w: Windows) -> dict:
        for step in range(w.total_steps):
            w.before_step(step)
            w.after_step(step, 1)
        return w.summary()

    module = types.ModuleType("lightning_modules.tiny.benchmark")
    module.peer, module.PEER_NAME = peer, "Loop X"
    monkeypatch.setitem(sys.modules, "lightning_modules.tiny", types.ModuleType("lightning_modules.tiny"))
    monkeypatch.setitem(sys.modules, "lightning_modules.tiny.benchmark", module)
    monkeypatch.setattr(harness, "SEARCH_PATH", TEST_CONF)
    rows = harness.main(["--tasks", "tiny", "--warmup", "1", "--steps", "2", "--windows", "1", "--out", str(tmp_path)])
    names = [r["impl"] for r in rows]
    assert names == ["suite", "plain", "peer: Loop X"]
    suite, peer_row = rows[0], rows[2]
    assert suite["ratio_peer"] == pytest.approx(suite["items_per_sec"] / peer_row["items_per_sec"])
    assert "tiny: suite / peer =" in (tmp_path / "results.md").read_text()
