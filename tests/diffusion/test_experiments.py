"""The benchmark configs compose to what the issue asks for."""
import pytest
from hydra.utils import instantiate

from suite.train import run
from tests.conftest import SHARED_DATA
from tests.diffusion.conftest import TINY_OVERRIDES


def test_bench_profile_is_the_ddpm_cifar10_unet(make_config):
    cfg = make_config("model=diffusion", "experiment=bench_diffusion")
    assert cfg.batch_size == 128 and cfg.data.channels == 3 and cfg.data.image_size == 32
    model = instantiate(cfg.model)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 35.7


def test_mnist_cond_settings(make_config):
    cfg = make_config("experiment=mnist_cond", "data.data_dir=/somewhere")
    assert cfg.data.val_size == 2000 and cfg.data.pad == 2 and cfg.data.resize is False and cfg.data.format == "idx"
    assert cfg.model.guidance_scale == 2.0 and cfg.model.num_inference_steps == 50 and cfg.model.num_classes == 10
    assert cfg.monitor.metric == "val/fd_classifier"
    assert cfg.model.compile and cfg.model.compile_mode == "reduce-overhead"
    assert list(cfg.model.guidance_interval) == [0, 400]
    from callbacks.fid import guidance_settings  # the same noise without guidance and guided at every step

    assert guidance_settings(cfg.callbacks.sample_quality.also_guidance) == {
        "_g1": (1.0, None), "_g2_t0-999": (2.0, [0, 999])}


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "diffusion" / "mnist").is_dir(), reason="shared MNIST not present")
def test_mnist_cond_pipeline_on_shared_data(make_config):
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.image_size")]
    cfg = make_config("experiment=mnist_cond", f"data.data_dir={SHARED_DATA / 'diffusion' / 'mnist'}",
                      "debug=fast_dev_run", *overrides, "model.net.attention_resolutions=[16]",
                      "model.compile=false")
    assert run(cfg) is not None
