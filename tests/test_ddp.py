"""DDP on 2 CPU processes (gloo) matches one process on the same global batch."""
from __future__ import annotations

import torch

# 23 samples -> 16 training samples: one global batch of 16 per step in both runs, 8 per rank under DDP.
COMMON = ("model=tiny", "data.num_samples=23", "batch_size=16", "batch_size_is_global=true", "max_epochs=3",
          "deterministic=true", "device=cpu", "logger=csv", "optimizer=sgd", "optimizer.lr=0.1",
          "gradient_clip_val=0", "callbacks.nan_recovery=null")


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


def test_predict_on_several_devices_runs_on_one_so_outputs_are_complete(make_config, monkeypatch, caplog):
    """Under DDP each rank would predict a share and rank 0 would write only its own: predict takes
    one device instead (and says so); under torchrun, where ranks already exist, it is an error."""
    import pytest

    from suite.train import _resolve_hardware

    cfg = make_config("model=tiny", "mode=predict", "trainer=ddp", "trainer.devices=2", "device=cpu")
    with caplog.at_level("INFO"):
        _resolve_hardware(cfg)
    assert cfg.trainer.devices == 1 and cfg.trainer.strategy == "auto"
    assert "mode=predict runs on one device" in caplog.text
    fit = make_config("model=tiny", "trainer=ddp", "trainer.devices=2", "device=cpu")
    _resolve_hardware(fit)
    assert fit.trainer.devices == 2  # training keeps its devices
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(ValueError, match="mode=predict writes one set of outputs"):
        _resolve_hardware(make_config("model=tiny", "mode=predict", "trainer=ddp", "trainer.devices=2", "device=cpu"))
