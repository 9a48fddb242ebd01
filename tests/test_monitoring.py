"""GPU utilisation and memory are logged on GPU runs; a CPU run says once that they are not."""
from __future__ import annotations

import logging

import pytest

from suite.train import run
from tests.training_helpers import _rows


def test_a_cpu_run_says_once_that_gpu_use_is_not_logged(make_config, caplog):
    with caplog.at_level(logging.INFO, logger="callbacks.monitor"):
        run(make_config("model=tiny", "max_epochs=2", "trainer.log_every_n_steps=2"))
    notices = [r for r in caplog.records if "GPU utilisation and memory are logged on GPU runs" in r.message]
    assert len(notices) == 1 and "CPU" in notices[0].message


@pytest.mark.gpu
def test_a_gpu_run_logs_utilisation_and_memory(make_config, tmp_path):
    import pynvml  # noqa: F401  (a declared dependency: the import itself is part of the check)

    run(make_config("model=tiny", "max_epochs=2", "trainer.log_every_n_steps=2", "device=cuda"))
    rows = _rows(tmp_path / "run")
    for key in ("perf/gpu_util", "perf/gpu_mem_gb", "perf/gpu_mem_peak_gb"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values, f"{key} is logged"
