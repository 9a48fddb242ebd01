"""Several processes on CPU (gloo): DDP and FSDP match one process on the same global batch; predict takes one
device; a killed rank stops the job clearly and the run resumes."""
from __future__ import annotations

import pytest
import torch

# 23 samples -> 16 training samples: one global batch of 16 per step in both runs, 8 per rank under DDP.
COMMON = ("model=tiny", "data.num_samples=23", "batch_size=16", "batch_size_is_global=true", "max_epochs=3",
          "deterministic=true", "device=cpu", "logger=csv", "optimizer=sgd", "optimizer.lr=0.1",
          "gradient_clip_val=0", "callbacks.nan_recovery=null", "num_workers=0")  # the gradient check needs no workers


def _weights(tmp_path, name):
    path = tmp_path / "logs" / "tiny" / name / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_ddp_gradients_match_single_process_on_the_same_global_batch(cli, tmp_path):
    single = cli(*COMMON, "run_name=single")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = cli(*COMMON, "trainer=ddp", "trainer.devices=2", "run_name=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _weights(tmp_path, "single"), _weights(tmp_path, "ddp")
    assert one.keys() == two.keys()
    for name in one:
        # Averaging the ranks' mean gradients equals the global mean; only summation order differs.
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-6), name


class _ParentPids(torch.utils.data.Dataset):
    """Each item: its index and the pid of the process that started the worker reading it."""

    def __len__(self):
        return 40

    def __getitem__(self, index):
        import os

        return index, os.getppid()


def test_loader_workers_of_a_ddp_rank_start_from_a_forkserver_that_outlives_a_job_wide_stop_signal(tmp_path):
    """A rank runs gloo/NCCL and queue-feeder threads; a worker forked from it can inherit a held lock and hang
    before its first batch (a DDP multirun job once did, in the slow tier). Under a process group the workers
    start from a clean server. A scheduler's SIGTERM to the whole job reaches that server too: it must not take
    the workers with it, so the rank can stop cleanly after its batch."""
    import os
    import signal
    import time

    import torch.distributed as dist

    from datamodules.base import BaseDataModule

    dm = BaseDataModule({"num_workers": 1, "batch_size": 8, "persistent_workers": False})
    assert dm.make_loader(_ParentPids()).multiprocessing_context is None, "one process: the platform's default"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = dm.make_loader(_ParentPids())
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        batches = iter(loader)
        index, parents = next(batches)
        server = int(parents[0])
        assert server != os.getpid(), "the worker's parent is the server, not the rank"
        os.kill(server, signal.SIGTERM)
        time.sleep(0.2)
        seen = [*index.tolist(), *(i for more, _ in batches for i in more.tolist())]
        assert sorted(seen) == list(range(40))
        assert sum(len(i) for i, _ in loader) == 40, "the next epoch's workers start from the same server"
    finally:
        dist.destroy_process_group()


def test_predict_on_several_devices_runs_on_one_so_outputs_are_complete(make_config, monkeypatch, caplog):
    """Under DDP each rank would predict a share and rank 0 would write only its own: predict takes
    one device instead (and says so); under torchrun, where ranks already exist, it is an error."""
    from suite.hardware import resolve_hardware

    cfg = make_config("model=tiny", "mode=predict", "trainer=ddp", "trainer.devices=2", "device=cpu")
    with caplog.at_level("INFO"):
        resolve_hardware(cfg)
    assert cfg.trainer.devices == 1 and cfg.trainer.strategy == "auto"
    assert "mode=predict runs on one device" in caplog.text
    fit = make_config("model=tiny", "trainer=ddp", "trainer.devices=2", "device=cpu")
    resolve_hardware(fit)
    assert fit.trainer.devices == 2  # training keeps its devices
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(ValueError, match="mode=predict writes one set of outputs"):
        resolve_hardware(make_config("model=tiny", "mode=predict", "trainer=ddp", "trainer.devices=2", "device=cpu"))


def test_sweep_jobs_side_by_side_spread_over_the_gpus(make_config, monkeypatch, caplog):
    """Under the joblib launcher several one-device jobs run at once: job n takes GPU n mod count
    instead of all of them sharing the first. Other device choices and lone GPUs are left alone."""
    from types import SimpleNamespace

    from suite import hardware

    assert [hardware.gpu_of_parallel_job(1, job, 4) for job in range(6)] == [[0], [1], [2], [3], [0], [1]]
    assert hardware.gpu_of_parallel_job(1, 3, 1) == 1 and hardware.gpu_of_parallel_job(2, 3, 4) == 2
    assert hardware.gpu_of_parallel_job([1], 3, 4) == [1]
    monkeypatch.setattr(hardware, "resolve_accelerator", lambda accelerator: "gpu")
    monkeypatch.setattr(hardware, "resolve_precision", lambda precision, accelerator: "bf16-mixed")
    monkeypatch.setattr(hardware.torch, "set_float32_matmul_precision", lambda precision: None)  # no GPU settings leak
    monkeypatch.setattr(hardware.torch.backends.cudnn, "benchmark", hardware.torch.backends.cudnn.benchmark)
    monkeypatch.setattr(hardware.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(hardware.sweeps, "jobs_side_by_side", lambda: True)
    monkeypatch.setattr(hardware.HydraConfig, "get", staticmethod(lambda: SimpleNamespace(job=SimpleNamespace(num=6))))
    cfg = make_config("model=tiny")
    with caplog.at_level("INFO"):
        hardware.resolve_hardware(cfg)
    assert list(cfg.trainer.devices) == [2] and "job 6 trains on GPU 2 of 4" in caplog.text


@pytest.mark.slow
def test_killing_one_rank_stops_the_job_clearly_and_resume_continues(tmp_path):
    """SIGKILL one rank of a 2-process DDP run: the job ends within seconds (no hang in a collective)
    with an error naming the peer failure and the last checkpoint; resume=true goes on from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import ROOT, TEST_CONF, run_cli

    args = ("model=tiny", "trainer=ddp", "trainer.devices=2", "device=cpu", "logger=csv", "run_name=k",
            "callbacks.periodic_checkpoint.every_n_train_steps=20", "num_workers=0")
    cmd = [sys.executable, str(ROOT / "run.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
           "print_config=false", f"hydra.searchpath=[file://{TEST_CONF}]", *args, "max_epochs=100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "logs" / "tiny" / "k"
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("step*.ckpt")):
        assert time.time() < deadline and job.poll() is None, "no checkpoint before the kill"
        time.sleep(0.5)
    rank1 = psutil.Process(job.pid).children(recursive=True)[0]
    killed_at = time.time()
    os.kill(rank1.pid, signal.SIGKILL)
    try:
        out, _ = job.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("rank 0 hung after rank 1 died")
    assert job.returncode != 0 and time.time() - killed_at < 90
    assert "PeerRankFailed: Rank 0 of 2: another rank of this job stopped" in out
    log = (run_dir / "error.log").read_text()
    assert "checkpoints/" in log and "resume=true run_name=k" in log

    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    resumed = run_cli(tmp_path, *args, "resume=true", f"trainer.max_steps={step + 10}", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert after == step + 10


def test_a_hung_cli_run_fails_and_leaves_no_process_behind(tmp_path):
    """The tests' CLI helper kills the whole process group on a timeout (a hung DDP run once kept
    CI waiting on its pipes after rank 0 was killed)."""
    import time

    import psutil

    from tests.conftest import run_cli

    with pytest.raises(AssertionError, match="did not finish in 8 s"):
        run_cli(tmp_path, "model=tiny", "trainer=ddp", "trainer.devices=2", "device=cpu", "max_epochs=100000",
                "num_workers=2", timeout=8)
    time.sleep(1)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not left


@pytest.mark.slow  # two processes and a single-device run: about 18 s on 2 cores
def test_fsdp_matches_single_process_and_its_checkpoint_loads_into_one(cli, tmp_path):
    """trainer=fsdp on 2 CPU processes (gloo), each linear layer its own unit: the same weights as one
    process on the same global batch (clipped by the global gradient norm), saved as one full
    state dict that a plain single-device module loads strictly."""
    from tests.tiny_task import TinyModule

    clipped = ("gradient_clip_val=0.05",)  # small enough to clip every step: the norm must be the global one
    single = cli(*COMMON, *clipped, "run_name=single")
    assert single.returncode == 0, single.stderr[-3000:]
    fsdp = cli(*COMMON, *clipped, "trainer=fsdp", "trainer.devices=2", "run_name=fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "FSDP: sharding each Linear as its own unit" in (tmp_path / "logs" / "tiny" / "fsdp" / "run.log").read_text()
    one, two = _weights(tmp_path, "single"), _weights(tmp_path, "fsdp")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=0, atol=1e-6), name
    TinyModule().load_state_dict(two, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resumed_run_matches_an_uninterrupted_one(cli, tmp_path, strategy):
    args = (*COMMON, f"trainer={strategy}", "trainer.devices=2", "run_name=r")
    full = cli(*args[:-1], "run_name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    first = cli(*args, "max_epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = cli(*args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path, "full"), _weights(tmp_path, "r")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_the_launchers_kill_after_a_dead_rank_is_preceded_by_a_clear_error_log(make_config, tmp_path):
    """When a rank dies, Lightning's launcher SIGKILLs rank 0 from a watcher thread (under NCCL
    rank 0 may be stuck in a collective). The suite's watcher writes error.log first."""
    import subprocess
    import sys

    from common.lightning_private import ChildProcessObserver
    from suite.failures import log_before_the_launcher_kills

    cfg = make_config("model=tiny")
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    log_before_the_launcher_kills(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    dead.wait()
    rank0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for rank 0
    assert ChildProcessObserver(main_pid=rank0.pid, child_processes=[dead])._run()
    assert rank0.wait(timeout=10) == -9  # the launcher's kill still happens: no hang
    text = (tmp_path / "run" / "error.log").read_text()
    assert text.startswith("PeerRankFailed: Rank 0 of 1: another rank of this job stopped")
    assert "Launcher: rank 1 exited with code -9." in text


def test_what_needs_whole_weights_says_once_per_run_that_it_is_skipped_under_sharding(caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from common.parallel import skipped_when_sharded
    from suite.strategies import FSDPStrategy

    whole = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")))
    assert not skipped_when_sharded(whole, "Sample grids", "x")
    sharded, next_run = (SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy)) for _ in range(2))
    with caplog.at_level("WARNING"):
        assert all(skipped_when_sharded(sharded, "Sample grids", "Use mode=predict.") for _ in range(3))
        assert skipped_when_sharded(sharded, "Attention maps", "y")
        assert skipped_when_sharded(next_run, "Sample grids", "Use mode=predict.")
    said = [r.getMessage() for r in caplog.records]
    assert sum("Sample grids skipped" in m for m in said) == 2  # once per run, not once per validation
    assert any("FSDPStrategy" in m and "Use mode=predict." in m for m in said)
    assert len(said) == 3 and all("no rank holds the whole model" in m for m in said)


@pytest.mark.slow
def test_ddp_run_resumed_from_a_mid_epoch_checkpoint_matches_the_uninterrupted_one(cli, tmp_path):
    """Two ranks, resumed from the periodic checkpoint of step 3 of a 5-step epoch (where a killed job
    resumes from): each rank skips the samples that epoch already used, and the run ends with the
    weights of the one never stopped. The sampler once crashed here (IndexError)."""
    common = (*COMMON[:-1], "data.num_samples=103", "trainer=ddp", "trainer.devices=2", "max_epochs=10",
              "callbacks.periodic_checkpoint.every_n_train_steps=3")
    whole = cli(*common, "trainer.max_steps=8", "run_name=whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = cli(*common, "trainer.max_steps=4", "run_name=cut")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "logs" / "tiny" / "cut" / "checkpoints"
    (checkpoints / "last.ckpt").unlink()  # as if killed after the periodic checkpoint of step 3
    assert torch.load(checkpoints / "step0000003.ckpt", weights_only=True)["global_step"] == 3
    resumed = cli(*common, "trainer.max_steps=8", "run_name=cut", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, two = _weights(tmp_path, "whole"), _weights(tmp_path, "cut")
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_peer_failure_checks_read_the_world_size_of_a_running_process_group():
    """Inside a process group the size comes from torch.distributed (the slow rank-kill test needs 2 ranks)."""
    import torch.distributed as dist

    from suite.failures import is_peer_failure, world_size

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert world_size() == 1
        assert not is_peer_failure(RuntimeError("Connection reset by peer"))  # one rank: no peer to lose
    finally:
        dist.destroy_process_group()
