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


def test_the_triton_hash_encoding_matches_the_torch_path_on_the_gpu():
    """The fused kernels (what `auto` takes on a GPU) against the plain PyTorch encoding: values and table
    gradients at the default 16 levels, hashed levels included."""
    from lightning_modules.nerf.hashgrid import HashEncoding

    torch.use_deterministic_algorithms(False)  # a debug run earlier in this process (fast_dev_run) turned them on
    torch.manual_seed(0)
    encoding = HashEncoding(backend="torch").cuda()
    with torch.no_grad():
        for table in encoding.tables:
            table.uniform_(-1, 1)
    points, grad = torch.rand(1 << 16, 3, device="cuda"), torch.randn(1 << 16, encoding.out_dim, device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        encoding.backend = backend
        encoding.zero_grad(set_to_none=True)
        out = encoding(points)
        out.backward(grad)
        results[backend] = (out.detach(), [t.grad.clone() for t in encoding.tables])
    (out_torch, grads_torch), (out_triton, grads_triton) = results["torch"], results["triton"]
    assert torch.allclose(out_triton, out_torch, rtol=1e-5, atol=1e-5 * out_torch.abs().max().item())
    for fused, plain in zip(grads_triton, grads_torch, strict=True):
        assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())
