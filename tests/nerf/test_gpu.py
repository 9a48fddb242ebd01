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
    gradients at the default 16 levels, hashed levels included. Points lie on a 2^-12 lattice, so every
    level's scaled position (finest 2048 cells) is exact in float32 and only the order of additions differs:
    off the lattice the kernel's fused multiply-add keeps bits the torch path rounds away (1e-4 at 2048)."""
    from lightning_modules.nerf.hashgrid import HashEncoding

    torch.use_deterministic_algorithms(False)  # a debug run earlier in this process (fast_dev_run) turned them on
    torch.manual_seed(0)
    encoding = HashEncoding(backend="torch").cuda()
    assert max(encoding.resolutions) * 4096 <= 2**24 and not all(encoding.dense)
    with torch.no_grad():
        for table in encoding.tables:
            table.uniform_(-1, 1)
    points = torch.randint(0, 4097, (1 << 16, 3), device="cuda").float() / 4096
    grad = torch.randn(1 << 16, encoding.out_dim, device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        encoding.backend = backend
        encoding.zero_grad(set_to_none=True)
        out = encoding(points)
        out.backward(grad)
        results[backend] = (out.detach(), [t.grad.clone() for t in encoding.tables])
    (out_torch, grads_torch), (out_triton, grads_triton) = results["torch"], results["triton"]
    assert torch.allclose(out_triton, out_torch, rtol=1e-5, atol=1e-6)
    for fused, plain in zip(grads_triton, grads_torch, strict=True):
        assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())


def test_torch_compile_traces_the_triton_hash_kernels_without_falling_back(caplog):
    """A compiled render (the nerf GPU default) traces the kernels to see what they write; when that trace
    fails, torch logs the whole traceback at every trace (70k log lines a 2-minute run) and assumes every
    input is written."""
    from lightning_modules.nerf.hashgrid import HashEncoding

    torch.use_deterministic_algorithms(False)
    encoding = HashEncoding(backend="triton").cuda()
    points = torch.rand(4096, 3, device="cuda")
    compiled = torch.compile(lambda p: encoding(p).square().sum(), fullgraph=True)
    with caplog.at_level("WARNING", logger="torch._higher_order_ops.triton_kernel_wrap"):
        compiled(points).backward()
    assert not [r for r in caplog.records if "identify_mutated_tensors" in r.getMessage()]
    assert all(t.grad is not None for t in encoding.tables)


def test_a_sample_budget_compiles_the_training_render_once_with_cuda_graphs_and_trains_as_the_exact_path():
    """model.sample_budget on the GPU default path (compile auto: CUDA graphs): one graph for the training render,
    no recompilation over steps, no host sync in a step, and the exact path's loss where the budget holds every
    sample."""
    from common.fast_path import CompileCounter
    from tests.nerf.test_hashgrid import HASH
    from tests.nerf.test_train import _ray_batch

    torch.use_deterministic_algorithms(False)
    batch = {k: v.cuda() for k, v in _ray_batch(64).items()}
    losses = {}
    for budget in (None, 64 * 64, "auto"):  # auto: exact for the grid's 2 warm-up steps, then sized and compiled
        torch._dynamo.reset()  # each variant as a run of its own (dynamo keeps the last one's code and guards)
        torch.manual_seed(0)
        module = NerfModule(net=HASH, num_samples=8, num_importance=8, renderer="occupancy", grid_resolution=8,
                            march_samples=64, perturb=False, density_activation="trunc_exp", grid_warmup_steps=2,
                            sample_budget=budget).cuda()
        assert module.compile_decision.on == (budget is not None), module.compile_decision.reason
        counter = CompileCounter().start()
        for step in range(4):
            # the last step, past auto's sizing and the grid's update: nothing in it may wait for the device
            torch.cuda.set_sync_debug_mode("error" if step == 3 and budget is not None else "default")
            module.zero_grad(set_to_none=True)  # as Lightning does: a replay overwrites the last one's gradients
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = module.training_step(batch, step)
                loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            losses.setdefault(budget, []).append(float(loss))
        graphs, recompiles = counter.counts()
        counter.stop()
        if budget is not None:
            assert graphs == 1 and recompiles == 0, (graphs, recompiles)
    assert losses[None] == pytest.approx(losses[64 * 64], rel=2e-2), losses  # no optimizer step: the same weights
    assert losses[None] == pytest.approx(losses["auto"], rel=2e-2), losses


def test_a_sample_budget_trains_under_deterministic_algorithms_as_the_debug_configs_set_them():
    """The budget's slots gather and scatter with a repeated spare index; deterministic CUDA kernels must accept
    that and give the exact path's loss where every sample has a slot."""
    import os

    from tests.nerf.test_sample_budget import _module, _step
    from tests.nerf.test_train import _ray_batch
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what Lightning's deterministic=True sets
    torch.use_deterministic_algorithms(True)
    try:
        batch = {k: v.cuda() for k, v in _ray_batch(8).items()}
        exact, _, _ = _step(_module(None, True, compile=False).cuda(), batch)
        budgeted, out, _ = _step(_module(8 * 16, True, compile=False).cuda(), batch)
        cut, _, _ = _step(_module(32, True, compile=False).cuda(), batch)  # spare slots point past the last sample
        assert out["complete"].all() and float(budgeted) == pytest.approx(float(exact), rel=1e-5)
        assert torch.isfinite(cut)
    finally:
        torch.use_deterministic_algorithms(False)
