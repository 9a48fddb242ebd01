"""Shared fixtures: compose the Hydra config once per test with every output under tmp_path."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from suite.compose import compose_config as _compose

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TEST_CONF = ROOT / "tests" / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(tmp_path: Path, *overrides: str, test_conf: bool = True) -> DictConfig:
    """The config `python run.py <overrides>` would get, writing under tmp_path, debug-friendly."""
    base = [f"paths.data_dir={tmp_path / 'data'}", "logger=csv", "num_workers=0", "device=cpu", "print_config=false"]
    return _compose(tmp_path, *base, *overrides, search_path=TEST_CONF if test_conf else None)


@pytest.fixture
def make_config(tmp_path):
    """make_config("model=tiny", "max_epochs=2") -> composed config rooted at tmp_path."""
    return lambda *overrides, **kw: compose_config(tmp_path, *overrides, **kw)


def run_cli(tmp_path: Path, *args: str, timeout: int = 300, env: dict | None = None,
            test_conf: bool = True) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` as a user would, with outputs under tmp_path."""
    cmd = [sys.executable, str(ROOT / "run.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
           "print_config=false"]
    if test_conf:
        cmd.append(f"hydra.searchpath=[file://{TEST_CONF}]")
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    flags = [a for a in args if a.startswith("-")]  # -m etc. must precede the overrides
    cmd = cmd[:2] + flags + cmd[2:] + [a for a in args if not a.startswith("-")]
    # Its own process group: on a timeout every process it started (DDP ranks, loader workers) is
    # killed, so a hung run fails the test instead of holding the output pipes open for ever.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"`{' '.join(cmd[2:])}` did not finish in {timeout} s; its output ends:\n"
                             f"{(out or '')[-2000:]}\n{(err or '')[-4000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def cli(tmp_path):
    return lambda *args, **kw: run_cli(tmp_path, *args, **kw)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
