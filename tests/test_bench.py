"""`make bench` (bench/): the rows, their order and ratios, the target table, and each task's peer, run
tiny on CPU: checked for working, not for their numbers."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from tests.conftest import TEST_CONF


@pytest.fixture
def harness(monkeypatch):
    from bench import harness, rows

    monkeypatch.setattr(rows, "SEARCH_PATH", TEST_CONF)
    return harness


def bench(harness, tmp_path, *args: str) -> list[dict]:
    return harness.main(["--tasks", "tiny", "--warmup", "1", "--steps", "2", "--windows", "1", "--out", str(tmp_path),
                         "--data-dir", str(tmp_path / "data"), *args])


def test_bench_harness_runs_every_row_on_cpu(tmp_path, harness):
    """plain eager, suite eager, suite default, and a dash for a task without a peer; FLOPs counted on
    the plain loop's eager step; time to first step on every measured row; the targets table at the end."""
    rows = bench(harness, tmp_path)
    assert [r["key"] for r in rows] == ["plain", "suite_eager", "suite", "peer"]
    assert [r["impl"] for r in rows] == ["plain eager", "suite eager", "suite default", "peer"]
    measured, dash = rows[:3], rows[3]
    assert all(r["items_per_sec"] > 0 and r["median_step_ms"] > 0 and r["first_step_s"] > 0 for r in measured)
    assert measured[0]["flops_per_step"] > 0 and "items_per_sec" not in dash
    # the wait for the batch is timed in every row, apart from the rest of the host time between steps
    assert all(0 < r["fetch_share"] < r["wait_share"] for r in measured[1:]), [r["fetch_share"] for r in measured]
    assert 0 < measured[0]["fetch_share"]
    assert measured[2]["ratio"] == pytest.approx(measured[2]["items_per_sec"] / measured[0]["items_per_sec"])
    md = (tmp_path / "results.md").read_text()
    assert "| tiny | suite default |" in md and "| tiny | peer | —" in md and "no peer for this task" in md
    assert "| tiny | suite eager / plain eager >= 0.970 |" in md
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["key"] == "plain"


def test_rows_alternate_by_round_and_pool_their_windows(tmp_path, harness, monkeypatch):
    """--rounds 2: plain, suite eager, suite, then again; each row's median is over both rounds' windows."""
    order = []
    for name in ("measure_suite", "measure_plain"):
        real = getattr(harness, name)
        monkeypatch.setattr(harness, name, lambda root, o, w, _real=real, _name=name: order.append(_name) or _real(root, o, w))
    rows = harness.main(["--tasks", "tiny", "--rounds", "2", "--warmup", "1", "--steps", "1", "--windows", "3",
                         "--impls", "plain,suite_eager,suite", "--out", str(tmp_path)])
    assert order == ["measure_plain", "measure_suite", "measure_suite"] * 2
    for row in rows:
        assert row["rounds"] == 2 and len(row["window_ms"]) == 6 and len(row["first_step_by_round"]) == 2
        assert row["median_step_ms"] == pytest.approx(statistics.median(row["window_ms"]))
    assert (tmp_path / "tiny" / "suite" / "round2" / "config.yaml").is_file()
    md = (tmp_path / "results.md").read_text()
    assert "2 alternating rounds" in md and "suite default / plain eager = " in md and "by round" in md
    assert len(rows[2]["ratio_by_round"]) == 2


def test_eager_rows_turn_compile_off_and_the_default_row_leaves_it(tmp_path, harness):
    """A task with model.compile: plain, suite eager and peer get model.compile=false; the suite default
    row gets the task's own setting; nerf's rows without a Trainer get the ray buffer on the device."""
    spec = harness.task_spec("nerf", False, [], tmp_path)
    plan = {key: overrides for key, _, _, overrides in harness.row_plan(spec, ["plain", "suite_eager", "suite", "peer",
                                                                                "occupancy"])}
    assert "model.compile=false" in plan["plain"] and "model.compile=false" in plan["suite_eager"]
    assert "model.compile=false" in plan["peer"] and not any(o.startswith("model.compile") for o in plan["suite"])
    assert "data.ray_device=cpu" in plan["plain"] and "data.ray_device=cpu" not in plan["suite"]
    assert "model.renderer=occupancy" in plan["occupancy"]
    assert harness.task_spec("clinical", False, [], tmp_path)["peer"] is None


def test_the_cpu_dry_runs_shrink_goes_only_where_it_applies_and_a_users_inapplicable_setting_is_refused(tmp_path,
                                                                                                      harness):
    """The dry run's vanilla sample counts stay off rows with another renderer (the occupancy row, or every row with
    `-o nerf:model.renderer=occupancy`); so does a user's -o (each row reads those it can); one that no row reads
    stops the bench, and the plain loop refuses such a setting as run.py does."""
    from bench.rows import prepare_task
    from suite.config_checks import ConfigError

    def plan(extra):
        spec = harness.task_spec("nerf", False, extra, tmp_path)
        return {key: overrides for key, _, _, overrides in harness.row_plan(spec, ["plain", "suite", "occupancy"])}

    default, occupancy = plan([]), plan(["model.renderer=occupancy"])
    assert "model.num_samples=16" in default["plain"] and "model.num_samples=16" not in default["occupancy"]
    assert not any(o.startswith(("model.num_samples", "model.num_importance")) for row in occupancy.values() for o in row)
    assert all("data.num_rays=256" in row for row in occupancy.values())
    shared = plan(["model.grid_resolution=8"])
    assert "model.grid_resolution=8" in shared["occupancy"] and "model.grid_resolution=8" not in shared["plain"]
    forced = plan(["++model.grid_resolution=8"])  # Hydra's prefixes name the same key
    assert "++model.grid_resolution=8" in forced["occupancy"] and "++model.grid_resolution=8" not in forced["plain"]
    spec = harness.task_spec("nerf", False, ["model.renderer=occupancy"], tmp_path)
    peer = dict((key, overrides) for key, _, _, overrides in harness.row_plan(spec, ["suite", "peer"]))["peer"]
    assert "model.num_samples=16" in peer, "the vanilla peer's own network keeps the dry run's sample counts"
    with pytest.raises(ConfigError, match="no row asked for reads model.grid_resolution=8"):
        harness.row_plan(harness.task_spec("nerf", False, ["model.grid_resolution=8"], tmp_path), ["plain", "suite"])
    with pytest.raises(ConfigError, match="model.grid_resolution would be ignored"):
        prepare_task(tmp_path, [*shared["plain"], "model.grid_resolution=8"], torch.device("cpu"))


def test_a_tasks_minimum_warm_up_applies_on_a_gpu_only(tmp_path, harness):
    """license_plate's images differ in size: on a GPU its rows warm up for MIN_WARMUP steps at least."""
    from lightning_modules.license_plate.benchmark import MIN_WARMUP

    assert harness.task_spec("license_plate", True, [], tmp_path)["min_warmup"] == MIN_WARMUP > 0
    assert harness.task_spec("license_plate", False, [], tmp_path)["min_warmup"] == 0
    assert harness.task_spec("nerf", True, [], tmp_path)["min_warmup"] == 0


def test_ratio_by_round_pairs_each_round_with_the_same_rounds_base():
    from bench.harness import ratio_by_round

    suite = [{"items_per_sec": 90.0}, {"error": "boom"}, {"items_per_sec": 120.0}]
    plain = [{"items_per_sec": 100.0}, {"items_per_sec": 100.0}, {"items_per_sec": 100.0}]
    assert ratio_by_round(suite, plain) == pytest.approx([0.9, 1.2])


def test_lightning_row_runs_the_suite_without_callbacks_or_logger(tmp_path, harness):
    from omegaconf import OmegaConf

    rows = bench(harness, tmp_path, "--impls", "suite,lightning,plain")
    assert [r["key"] for r in rows] == ["suite", "lightning", "plain"]
    assert rows[1]["items_per_sec"] > 0 and rows[1]["ratio"] > 0
    bare = OmegaConf.load(tmp_path / "tiny" / "lightning" / "config.yaml")
    full = OmegaConf.load(tmp_path / "tiny" / "suite" / "config.yaml")
    assert not bare.callbacks and not bare.logger and full.callbacks.nan_recovery and full.logger


def test_the_lightning_row_runs_eager_as_the_plain_loop_it_is_compared_with():
    from bench.harness import row_plan

    spec = {"task": "nerf", "base": ["model=nerf"], "eager": ["model.compile=false"], "outside": [], "peer": None,
            "fast": [], "variants": {}, "cpu": [], "extra": []}
    plan = {key: overrides for key, _, _, overrides in row_plan(spec, ["plain", "suite_eager", "lightning", "suite"])}
    assert plan["lightning"] == plan["suite_eager"] == ["model=nerf", "model.compile=false"]
    assert plan["suite"] == ["model=nerf"]


def test_merged_rounds_take_the_median_of_all_windows_and_keep_failures_visible():
    from bench.timing import merge_rounds

    a = {"window_ms": [10.0, 30.0], "items_per_step": 4, "wait_share": 0.1, "peak_mem_gb": 1.0, "cpu_window_ms": [5, 7],
         "first_step_s": 9.0}
    b = {"window_ms": [20.0, 40.0], "items_per_step": 4, "wait_share": 0.3, "peak_mem_gb": 2.0, "cpu_window_ms": [9, 11],
         "first_step_s": 3.0}
    merged = merge_rounds([a, b, {"error": "RuntimeError: boom"}])
    assert merged["median_step_ms"] == 25.0 and merged["spread_ms"] == 30.0 and merged["host_cpu_ms"] == 8.0
    assert merged["items_per_sec"] == pytest.approx(4 / 0.025)
    assert merged["wait_share"] == pytest.approx(0.2) and merged["peak_mem_gb"] == 2.0
    assert merged["first_step_s"] == 9.0 and merged["first_step_by_round"] == [9.0, 3.0]  # round 1's: the cold one
    assert merged["rounds"] == 2 and merged["error"].startswith("1 of 3 rounds failed: RuntimeError")
    assert merge_rounds([a]) is a


def test_time_to_first_step_counts_from_the_rows_start_to_step_0s_end():
    import time

    from bench.timing import TimedWindows

    w = TimedWindows(1, 1, 1, torch.device("cpu"))
    time.sleep(0.05)
    w.before_step(0)
    w.after_step(0, 1)
    w.before_step(1)
    w.after_step(1, 1)
    assert 0.05 <= w.summary()["first_step_s"] < 1.0


def test_explain_measures_the_suite_without_each_per_step_callback(tmp_path, harness, monkeypatch):
    keys = harness.per_step_callbacks(tmp_path / "c", ["model=tiny", "device=cpu"])
    # checkpointing acts at validation or every N steps through Lightning's own hooks; these run every step
    assert {"nan_recovery", "monitor", "training_curves", "progress_bar"} <= set(keys)
    assert not {"model_checkpoint", "last_checkpoint", "periodic_checkpoint", "random_state"} & set(keys)
    monkeypatch.setattr(harness, "per_step_callbacks", lambda root, overrides: ["nan_recovery", "monitor"])
    rows = bench(harness, tmp_path, "--impls", "suite,plain", "--explain")
    assert [r["impl"] for r in rows] == ["suite default", "plain eager", "suite, hooks timed",
                                         "suite without nan_recovery", "suite without monitor"]
    assert rows[3]["saved_ms"] == pytest.approx(rows[0]["median_step_ms"] - rows[3]["median_step_ms"])
    from omegaconf import OmegaConf

    config = OmegaConf.load(tmp_path / "tiny" / "explain" / "without-monitor" / "config.yaml")
    assert config.callbacks.monitor is None and config.callbacks.nan_recovery is not None
    assert "nan_recovery costs" in (tmp_path / "results.md").read_text()


def test_explain_takes_the_eager_rows_settings_when_only_suite_eager_is_asked_for(tmp_path, harness, monkeypatch):
    """Issue 27's eager target is missed on host-bound tasks: --explain then says which callback costs what there."""
    monkeypatch.setattr(harness, "per_step_callbacks", lambda root, overrides: ["monitor"])
    monkeypatch.setattr(harness, "task_spec", lambda *a, _spec=harness.task_spec: {**_spec(*a), "eager": ["seed=7"]})
    rows = bench(harness, tmp_path, "--impls", "suite_eager,plain", "--explain", "--rounds", "2")
    assert [r["impl"] for r in rows] == ["suite eager", "plain eager", "suite, hooks timed", "suite without monitor"]
    assert rows[3]["saved_ms"] == pytest.approx(rows[0]["median_step_ms"] - rows[3]["median_step_ms"])
    assert rows[3]["rounds"] == 2  # as many as the rows it is compared with: one round's windows are noise there
    from omegaconf import OmegaConf

    config = OmegaConf.load(tmp_path / "tiny" / "explain" / "without-monitor" / "round2" / "config.yaml")
    assert config.seed == 7 and config.callbacks.monitor is None  # the eager row's overrides, less the callback
    assert OmegaConf.load(tmp_path / "tiny" / "explain" / "hooks-timed" / "config.yaml").seed == 7


def test_peer_row_is_named_and_compared_with_the_suite(tmp_path, harness, monkeypatch):
    """A task's `peer` hook joins the table under its own name, with suite default / peer beside it;
    it gets the task prepared (config, datamodule, module, precision) with compile off."""
    import sys
    import types

    from common.timing import Windows

    seen = {}

    def peer(task_root, prepared, w: Windows) -> dict:
        seen["prepared"] = prepared
        for step in range(w.total_steps):
            w.before_step(step)
            w.after_step(step, 1)
        return w.summary()

    module = types.ModuleType("lightning_modules.tiny.benchmark")
    module.peer, module.PEER_NAME = peer, "Loop X"
    monkeypatch.setitem(sys.modules, "lightning_modules.tiny", types.ModuleType("lightning_modules.tiny"))
    monkeypatch.setitem(sys.modules, "lightning_modules.tiny.benchmark", module)
    rows = bench(harness, tmp_path, "--rounds", "2")
    assert [r["impl"] for r in rows] == ["plain eager", "suite eager", "suite default", "peer: Loop X"]
    suite, peer_row = rows[2], rows[3]
    assert suite["ratio_peer"] == pytest.approx(suite["items_per_sec"] / peer_row["items_per_sec"])
    assert len(suite["ratio_peer_by_round"]) == 2
    assert "tiny: suite default / peer =" in (tmp_path / "results.md").read_text()
    cfg, dm, model, precision = seen["prepared"]
    assert cfg.model._target_ == "tests.tiny_task.TinyModule" and precision == "32-true"


def test_targets_table_says_pass_fail_or_not_measured(tmp_path):
    from bench.report import summarize, targets, write_results

    rows = [{"task": "clinical", "key": "plain", "impl": "plain eager", "items_per_sec": 100.0},
            {"task": "clinical", "key": "suite", "impl": "suite default", "items_per_sec": 140.0, "ratio": 1.4,
             "wait_share": 0.08, "fetch_share": 0.06},
            {"task": "clinical", "key": "suite_eager", "impl": "suite eager", "items_per_sec": 99.0, "ratio": 0.99},
            {"task": "bert_base", "key": "suite", "impl": "suite default", "items_per_sec": 1.0, "mfu": 0.31}]
    table = targets(rows)
    assert "| clinical | suite default / plain eager >= 1.300 | 1.400 | PASS |" in table
    assert "| clinical | data wait (batch fetch and transfer), share of the suite's step < 5.0% | 6.0% | FAIL |" in table
    assert "| clinical | suite eager / plain eager >= 0.970 | 0.990 | PASS |" in table
    assert "| bert_base | MFU of the fast path (BERT-base, 512 x 32, bf16) >= 45.0% | 31.0% | FAIL |" in table
    assert "nerf" not in table  # a task that did not run is not listed
    for name, part in (("a", rows[:3]), ("b", rows[3:])):
        (tmp_path / name).mkdir()
        write_results(tmp_path / name, part, 1, 1, 1)
    both = summarize([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "| clinical | suite default / plain eager >= 1.300 | 1.400 | PASS |" in both and "31.0% | FAIL" in both


def test_time_to_quality_runs_each_budget_and_reads_the_test_metric(tmp_path, harness, monkeypatch):
    """`python -m bench.quality`: one run per budget, trainer.max_time set, test metrics in the table."""
    from bench import quality

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
    from bench import quality

    calls = []

    def measure(out, profile, minutes, overrides):
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


def test_bert_base_row_trains_a_config_built_encoder_through_legal_berts_module(tmp_path, monkeypatch):
    """bert_base: an encoder built from BertConfig with random weights, the bundled MiniLM's tokenizer,
    legal_bert's module; on a CPU the 2-layer stand-in, said so under the table. Without the MiniLM
    package (the GPU image), legal_bert's encoder is rebuilt from the exported config and tokenizer."""
    from bench import harness, hf_shapes

    rows = harness.main(["--tasks", "bert_base", "--warmup", "1", "--steps", "1", "--windows", "1",
                         "--out", str(tmp_path / "b")])
    assert [r["impl"] for r in rows] == ["plain eager", "suite default"]
    assert all("error" not in r and r["items_per_sec"] > 0 for r in rows) and rows[0]["flops_per_step"] > 0
    encoder = tmp_path / "b" / "data" / "bench_hf" / "bert_tiny"
    assert (encoder / "vocab.txt").is_file() and not (encoder / "1_Pooling").exists()
    assert "2-layer BERT" in (tmp_path / "b" / "results.md").read_text()

    exported = hf_shapes.export(tmp_path / "export" / "minilm")
    assert (exported / "config.json").is_file() and (exported / "1_Pooling" / "config.json").is_file()
    assert not list(exported.glob("*.safetensors"))  # no weights: under a megabyte to carry
    monkeypatch.setattr(hf_shapes, "EXPORT_DIR", tmp_path / "export")
    monkeypatch.setattr(hf_shapes, "bundled_model_dir", lambda: (_ for _ in ()).throw(FileNotFoundError("absent")))
    spec = harness.task_spec("legal_bert", False, [], tmp_path / "data")
    assert f"model.pretrained_path={tmp_path / 'data' / 'bench_hf' / 'minilm_random'}" in spec["base"]
    assert (tmp_path / "data" / "bench_hf" / "minilm_random" / "1_Pooling" / "config.json").is_file()  # pools as MiniLM


@pytest.mark.slow
def test_nerf_and_diffusion_peers_and_the_occupancy_row_run_tiny(tmp_path):
    """The vanilla NeRF and the diffusers example loop train a few steps on the tasks' own data, and
    nerf's occupancy-renderer row runs, at sizes a CPU does in seconds."""
    from bench import harness

    nerf = ["nerf:data.num_rays=16", "nerf:model.num_samples=4", "nerf:model.num_importance=4",
            "nerf:model.net.width=16", "nerf:model.net.depth=2", "nerf:model.net.skips=[1]", "nerf:data.scene_size=16",
            "nerf:model.march_samples=8", "nerf:model.grid_resolution=8"]
    diffusion = ["diffusion:batch_size=4", "diffusion:model.net.block_out_channels=[32,32]",
                 "diffusion:model.net.attention_resolutions=[16]", "diffusion:data.image_size=32"]
    rows = harness.main(["--tasks", "nerf,diffusion", "--impls", "plain,peer,occupancy", "--warmup", "1",
                         "--steps", "1", "--windows", "1", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data"),
                         *[a for o in nerf + diffusion for a in ("-o", o)]])
    names = [(r["task"], r["impl"]) for r in rows]
    assert names == [("nerf", "plain eager"), ("nerf", "peer: vanilla NeRF, plain PyTorch"),
                     ("nerf", "suite default, model.renderer=occupancy"),
                     ("diffusion", "plain eager"), ("diffusion", "peer: diffusers example loop (accelerate)")]
    assert all("error" not in r and r["items_per_sec"] > 0 for r in rows), [r.get("error") for r in rows]
    assert rows[1]["items_per_step"] == 16 and rows[4]["items_per_step"] == 4


def test_quality_profiles_take_the_o_settings_they_read_and_one_no_profile_reads_is_refused(tmp_path):
    from bench import quality
    from suite.config_checks import ConfigError

    fox, occupancy = (next(p for p in quality.profiles("nerf") if p["name"] == n) for n in ("fox", "hashgrid_fox"))
    assert "model.grid_resolution=8" not in quality.profile_overrides(fox, tmp_path, ["model.grid_resolution=8"])
    assert "model.grid_resolution=8" in quality.profile_overrides(occupancy, tmp_path, ["model.grid_resolution=8"])
    with pytest.raises(ConfigError, match="no profile asked for reads model.grid_resolution=8"):
        quality.main(["--tasks", "nerf", "--profiles", "fox", "-o", "nerf:model.grid_resolution=8",
                      "--out", str(tmp_path / "q"), "--data-root", str(tmp_path)])
    assert not list((tmp_path / "q").glob("fox-*")), "refused before any run"


def test_data_wait_is_reported_only_where_it_was_timed_and_a_configured_profiler_gives_way(caplog):
    from bench.timing import FetchProfiler, merge_rounds
    from common.timing import Windows

    untimed, timed = Windows(0, 2, 1, torch.device("cpu")), Windows(0, 2, 1, torch.device("cpu"))
    for step in range(2):
        untimed.before_step(step, 0.001)
        timed.before_step(step, 0.001, 0.0005)
        untimed.after_step(step, 1)
        timed.after_step(step, 1)
    assert "fetch_share" not in untimed.summary() and timed.summary()["fetch_share"] > 0
    assert "fetch_share" not in merge_rounds([untimed.summary(), untimed.summary()])
    with caplog.at_level("WARNING", logger="bench"):
        FetchProfiler(dirpath="/somewhere", filename="profile")  # debug=profiler's settings, merged under ours
    assert "trainer.profiler (dirpath, filename) is not used" in caplog.text



def test_gpu_windows_span_whole_logging_intervals_so_the_suite_pays_its_logging_steps_as_a_long_run_does(harness):
    """s20: license_plate's two 10-step windows held one of the suite's logging steps, 2.5x its weight in a run."""
    assert harness.window_steps(10, 50, gpu=True) == 50 and harness.window_steps(60, 50, gpu=True) == 100
    assert harness.window_steps(100, 50, gpu=True) == 100 and harness.window_steps(10, 0, gpu=True) == 10
    assert harness.window_steps(2, 50, gpu=False) == 2  # a CPU's dry run checks the code, not the numbers


def test_the_bench_counts_what_each_step_trained_on_as_the_runs_throughput_does():
    """A nerf step under a sample budget trains only the rays it did not cut short (a count on the device): the
    bench's rows count those too, read once when the windows are summed up."""
    import json

    from common.timing import Windows

    w = Windows(0, 2, 1, torch.device("cpu"))
    for step, trained in enumerate((torch.tensor(3), torch.tensor(5))):
        w.before_step(step)
        w.after_step(step, trained)
    summary = w.summary()
    assert summary["items_per_step"] == 4.0 and isinstance(summary["items_per_sec"], float)
    json.dumps(summary)  # results.json takes it as it is
