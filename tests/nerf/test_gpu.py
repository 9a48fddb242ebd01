"""On a CUDA GPU: the ray buffer lives on the device and both renderers train under bf16 autocast."""
import pytest
import torch

from datamodules.nerf import NerfDataModule
from lightning_modules.nerf import NerfModule
from suite.train import run
from tests.nerf.test_train import TINY, TINY_CLI

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("renderer", ["vanilla", "occupancy"])
def test_gpu_ray_buffer_and_bf16_step(tmp_path, renderer):
    dm = NerfDataModule(cache_dir=str(tmp_path / "scene"), scene_size=16, scene_views=(4, 2, 2), num_rays=128,
                        steps_per_epoch=2, ray_device="cuda")
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["origins"].is_cuda and batch["rgb"].shape == (128, 3)
    module = NerfModule(**TINY, renderer=renderer, march_samples=32, grid_resolution=16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_fast_dev_run_on_gpu(make_config):
    run(make_config("model=nerf", "debug=fast_dev_run", "device=cuda", "precision=bf16-mixed", *TINY_CLI))
