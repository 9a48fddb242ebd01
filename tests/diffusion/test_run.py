"""End to end through the shared machinery: run.py's fit, checkpoints with EMA, predict."""
from pathlib import Path

import pytest
import torch

from suite.train import run
from tests.conftest import compose_config
from tests.diffusion.conftest import TINY_OVERRIDES


def test_fast_dev_run(make_config, tmp_path, monkeypatch):
    from callbacks import fid

    steps = []
    real_train = fid.train_classifier
    monkeypatch.setattr(fid, "train_classifier", lambda *a, **k: steps.append(k["steps"]) or real_train(*a, **k))
    cfg = make_config("model=diffusion", "debug=fast_dev_run", *TINY_OVERRIDES,
                      "callbacks.sample_quality.classifier_steps=200")
    run(cfg)
    plots = list((tmp_path / "run" / "plots").glob("samples_epoch*.png"))
    assert plots, "no sample grid written"
    assert steps == [10]          # a quick check trains a quick classifier, and does not cache it
    assert not list(Path(cfg.paths.data_dir).rglob("classifier-*.pt"))


def test_fit_checkpoint_carries_ema_and_predict_uses_it(make_config, tmp_path):
    cfg = make_config("model=diffusion", "debug=limit", "max_epochs=1", "trainer.limit_train_batches=3",
                      "trainer.limit_val_batches=2", "trainer.limit_test_batches=1", "callbacks.ema.decay=0.5",
                      "callbacks.ema.warmup=false", "optimizer.lr=1e-3", *TINY_OVERRIDES)
    metric = run(cfg)
    assert metric is not None and metric >= 0  # val/fd_classifier, the monitored metric
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ema = ckpt["callbacks"]["EMA"]
    assert ema["num_updates"] == 3
    name = "unet.conv_out.weight"
    assert not torch.equal(ema["shadow"][name], ckpt["state_dict"][name])  # decay 0.5 lags the weights
    assert ckpt["callbacks"]["SampleQuality"]["classifier"]
    assert ckpt["class_names"] == [str(i) for i in range(10)]
    csv = (tmp_path / "run" / "csv" / "metrics.csv").read_text()
    for key in ("val/fd_classifier", "val/kid_classifier", "val/cond_accuracy", "val/fd_classifier_train_ref",
                "val/classifier_accuracy", "train/loss", "val/loss"):
        assert key in csv

    # Evaluating the checkpoint restores its EMA weights and feature classifier: the same score.
    vcfg = compose_config(tmp_path / "v", "model=diffusion", "mode=validate", f"ckpt_path={last}", "debug=limit",
                          "trainer.limit_val_batches=2", f"paths.data_dir={tmp_path / 'data'}", *TINY_OVERRIDES)
    assert run(vcfg) == pytest.approx(metric, rel=1e-4)

    pcfg = compose_config(tmp_path / "p", "model=diffusion", "mode=predict", f"ckpt_path={last}", "debug=default",
                          "data.predict_samples=2", f"paths.data_dir={tmp_path / 'data'}", *TINY_OVERRIDES)
    run(pcfg)
    out = Path(pcfg.paths.output_dir)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "samples_grid.png" in files and "samples/class_0/00000.png" in files and "samples/class_9/00001.png" in files


def test_ema_is_swapped_in_from_an_evaluated_checkpoint_and_out_again(tmp_path, tiny_module):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from callbacks.ema import EMA

    m = tiny_module()
    ema = EMA(decay=0.5, warmup=False)
    ema.update(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)  # shadow = raw - 0.5
    path = tmp_path / "x.ckpt"
    torch.save({"callbacks": {"EMA": ema.state_dict()}, "state_dict": m.state_dict()}, path)
    raw = {k: v.clone() for k, v in m.state_dict().items()}

    fresh = EMA(decay=0.99)
    trainer = SimpleNamespace(ckpt_path=str(path), state=SimpleNamespace(fn=TrainerFn.PREDICTING))
    fresh.on_predict_start(trainer, m)
    w = m.unet.conv_out.weight
    assert torch.allclose(w, raw["unet.conv_out.weight"] - 0.5)
    fresh.on_predict_end(trainer, m)
    assert all(torch.equal(v, raw[k]) for k, v in m.state_dict().items())


def test_monitoring_a_score_with_its_callback_off_fails_before_training(make_config, tmp_path):
    """Turning the sample-quality callback off while the checkpoint still monitors its metric used
    to fail only after the first validation epoch; it now fails at once and says what to set."""
    cfg = make_config("model=diffusion", "debug=fast_dev_run", *TINY_OVERRIDES, "callbacks.sample_quality=null")
    with pytest.raises(ValueError, match="set monitor.metric=val/loss monitor.mode=min"):
        run(cfg)
    run(compose_config(tmp_path / "ok", "model=diffusion", "debug=fast_dev_run", *TINY_OVERRIDES,
                       "callbacks.sample_quality=null", "monitor.metric=val/loss", "monitor.mode=min"))


def test_extra_guidance_settings_score_the_same_noise_under_their_own_names(make_config, tmp_path):
    """also_guidance: each setting gets its own FD/KID/accuracy from the same seeds, so a setting
    equal to the model's reproduces the main numbers exactly and the others differ."""
    cfg = make_config("model=diffusion", "debug=limit", "max_epochs=1", "trainer.limit_train_batches=1",
                      "trainer.limit_val_batches=2", "trainer.limit_test_batches=0", "model.guidance_scale=2.0",
                      "model.guidance_interval=[0,500]",
                      "callbacks.sample_quality.also_guidance=[{scale:2.0,interval:[0,500]},1.0,{scale:2.0,interval:[0,999]}]",
                      *TINY_OVERRIDES)
    run(cfg)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    val = {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}
    for name in ("fd_classifier", "kid_classifier", "cond_accuracy", "fd_classifier_ratio"):
        assert val[f"val/{name}_g2_t0-500"] == pytest.approx(val[f"val/{name}"], rel=1e-6)
        assert f"val/{name}_g1" in val
    # no guidance, and guidance at every step: after one training step guidance changes little
    # (least at low noise, which is all that separates g1 from the main setting), but it changes
    # the numbers where t0-500 matched them to 1e-6
    for other in ("g1", "g2_t0-999"):
        assert val[f"val/fd_classifier_{other}"] != pytest.approx(val["val/fd_classifier"], rel=1e-5)
    assert val["val/fd_classifier_ratio_g1"] == pytest.approx(val["val/fd_classifier_g1"] / val["val/fd_classifier_train_ref"])


@pytest.mark.parametrize("setting, match", [("[{scale:2.0,interval:[0,5000]}]", "also_guidance interval=\\[0, 5000\\]"),
                                            ("[{guidance:2.0}]", "also_guidance: .*expected a guidance scale")])
def test_a_bad_extra_guidance_setting_fails_before_training(make_config, setting, match):
    cfg = make_config("model=diffusion", "debug=fast_dev_run", *TINY_OVERRIDES,
                      f"callbacks.sample_quality.also_guidance={setting}")
    with pytest.raises(Exception, match=match):
        run(cfg)
