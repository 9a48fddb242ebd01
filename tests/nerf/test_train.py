"""The module: learning on a tiny scene, both renderers, metrics, and runs through the shared machinery."""
import logging
import math

import lightning as L
import pytest
import torch

from callbacks.psnr_ssim import PSNRSSIM
from common.fast_path import CompileCounter
from datamodules.nerf import NerfDataModule
from lightning_modules.nerf import NerfModule, rendering
from suite.train import run
from tests.conftest import compose_config
from tests.nerf.fixtures import write_blender, write_ngp

TINY = {"depth": 2, "width": 32, "skips": (1,), "pos_freqs": 4, "dir_freqs": 2, "num_samples": 16,
        "num_importance": 16}
TINY_NET_CLI = ["model.net.depth=2", "model.net.width=32", "model.net.skips=[1]", "model.net.pos_freqs=4",
                "model.net.dir_freqs=2"]
TINY_DATA_CLI = ["data.scene_size=16", "data.scene_views=[6,2,2]", "data.num_rays=64", "data.val_views=1",
                 "data.path_frames=3"]
TINY_VANILLA_CLI = ["model.num_samples=8", "model.num_importance=8"]  # a renderer's own settings: refused under others
TINY_OCCUPANCY_CLI = ["model.renderer=occupancy", "model.march_samples=32", "model.grid_resolution=16"]
TINY_CLI = [*TINY_NET_CLI, *TINY_VANILLA_CLI, *TINY_DATA_CLI]


def _val_psnr(module, dm):
    cb = PSNRSSIM()
    module.eval()
    for batch in dm.val_dataloader():
        cb.update("val", module._eval_view(batch, "val"), "cpu")
    module.train()
    return cb.metrics["val"]["psnr"].compute().item()


def tiny_scene(tmp_path, steps_per_epoch: int) -> NerfDataModule:
    """The built-in scene at 16 pixels (8 training views), 256 rays a batch, set up for fitting."""
    dm = NerfDataModule(cache_dir=str(tmp_path / "scene"), scene_size=16, scene_views=(8, 2, 2), num_rays=256,
                        steps_per_epoch=steps_per_epoch, val_views=2)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_on_tiny_scene(module, dm, lr: float):
    """Validation PSNR before and after one epoch of a plain loop (training_step needs no Trainer), and
    the last training batch."""
    before = _val_psnr(module, dm)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for i, batch in enumerate(dm.train_dataloader()):
        loss = module.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, _val_psnr(module, dm), batch


@pytest.mark.parametrize("renderer", ["vanilla", "occupancy"])
def test_psnr_rises_on_a_tiny_scene(tmp_path, renderer):
    torch.manual_seed(0)
    dm = tiny_scene(tmp_path, steps_per_epoch=60)
    module = NerfModule(**TINY, renderer=renderer, march_samples=48, grid_resolution=16, grid_warmup_steps=20,
                        grid_update_every=8)
    before, after, _ = train_on_tiny_scene(module, dm, lr=5e-3)
    assert after > before + 3.0, (before, after)


def test_occupancy_renderer_skips_empty_cells():
    module = NerfModule(**TINY, renderer="occupancy", march_samples=32, grid_resolution=8)
    module.grid.set_aabb(torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    module._grid_ready = True
    module.grid.occupied.zero_()
    calls = []
    module.coarse.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batch = {"origins": torch.tensor([[0.0, 0, 4]]), "dirs": torch.tensor([[0.0, 0, -1]]),
             "near": torch.tensor([[2.0]]), "far": torch.tensor([[6.0]]), "background": torch.tensor([0.1, 0.2, 0.3]),
             "aabb": torch.tensor([-1.0, -1, -1, 1, 1, 1])}
    out = module.render_rays(batch, perturb=False)
    assert calls == [0]  # nothing evaluated in an empty grid
    assert torch.allclose(out["rgb"], torch.tensor([[0.1, 0.2, 0.3]]))
    module.grid.occupied.fill_(True)
    calls.clear()
    module.render_rays(batch, perturb=False)
    # the ray crosses 2 of the box's 2*sqrt(3) diagonal: about 32 / sqrt(3) samples
    assert calls[0] == pytest.approx(32 / math.sqrt(3), abs=1.5)


def test_whole_views_render_in_chunks_identically_and_keep_no_graph():
    """Chunks bound memory only if no autograd graph joins them, outside a Trainer (scripts) too."""
    torch.manual_seed(0)
    module = NerfModule(**TINY, chunk=7).eval()
    batch = {"origins": torch.zeros(30, 3), "dirs": torch.nn.functional.normalize(torch.randn(30, 3), dim=-1),
             "near": torch.full((30, 1), 0.5), "far": torch.full((30, 1), 2.0), "background": torch.ones(3),
             "aabb": torch.tensor([-1.0, -1, -1, 1, 1, 1])}
    chunked = module.render_view(batch)
    module.hparams.chunk = 1000
    whole = module.render_view(batch)
    assert torch.allclose(chunked["rgb"], whole["rgb"], atol=1e-6)
    assert not chunked["rgb"].requires_grad and torch.is_grad_enabled()


def test_psnr_ssim_callback_values():
    cb = PSNRSSIM()
    target = torch.rand(8, 8, 3) * 0.5
    cb.update("val", {"rgb": target + 0.1, "target": target}, "cpu")  # MSE 0.01 -> 20 dB
    cb.update("val", {"rgb": target + 0.01, "target": target}, "cpu")  # MSE 1e-4 -> 40 dB
    assert cb.metrics["val"]["psnr"].compute().item() == pytest.approx(30.0, abs=1e-3)  # mean per view
    cb2 = PSNRSSIM()
    cb2.update("test", {"rgb": target, "target": target}, "cpu")
    assert cb2.metrics["test"]["ssim"].compute().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="same"):
        cb.update("val", {"rgb": torch.rand(4, 4, 3), "target": target}, "cpu")


def test_views_too_small_for_ssims_window_are_counted_out_of_ssim_and_psnr_still_scores_them(caplog):
    """A smoke-test render of 4 x 5 pixels: SSIM's 11-pixel window cannot slide over it (torchmetrics fails)."""
    cb, logged = PSNRSSIM(), {}
    module = type("Logs", (), {"log": lambda self, key, value, **kw: logged.__setitem__(key, float(value))})()
    small, large = torch.rand(4, 5, 3) * 0.5, torch.rand(8, 8, 3) * 0.5
    cb.update("val", {"rgb": small + 0.1, "target": small}, "cpu")  # 20 dB
    with caplog.at_level("WARNING"):
        cb.log_stage("val", module)
    assert logged == {"val/psnr": pytest.approx(20.0, abs=1e-3)}  # no SSIM: no view could be scored
    assert "val/ssim: 1 view(s) left out, under 6 pixels a side" in caplog.text
    cb.update("val", {"rgb": small + 0.1, "target": small}, "cpu")
    cb.update("val", {"rgb": large + 0.01, "target": large}, "cpu")  # 40 dB
    cb.log_stage("val", module)
    assert 0.9 < logged["val/ssim"] < 1.0 and logged["val/psnr"] == pytest.approx(30.0, abs=1e-3)  # SSIM: 8 x 8 only


def test_compiled_module_keeps_plain_state_dict():
    plain = NerfModule(**TINY)
    compiled = NerfModule(**TINY, compile=True)
    compiled._whole_renderer(perturb=True)  # wraps lazily; the wrapper must not enter the state dict
    assert set(compiled.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())


def test_bad_model_settings():
    with pytest.raises(ValueError, match="renderer"):
        NerfModule(renderer="instant")


def test_fit_then_predict_through_run(make_config, tmp_path):
    cfg = make_config("model=nerf", "debug=limit", "max_epochs=1", "data.steps_per_epoch=4", *TINY_CLI)
    assert run(cfg) is not None
    out = tmp_path / "run"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "plots" / "nerf_val_epoch000.png").is_file()
    assert (out / "plots" / "nerf_test_view000.png").is_file()
    metrics = (out / "csv").rglob("metrics.csv")
    text = "".join(p.read_text() for p in metrics)
    assert "val/psnr" in text and "train/loss" in text and "test/ssim" in text
    # a second run dir (the fixture always writes to <tmp>/run)
    cfg = compose_config(tmp_path / "p", "model=nerf", "mode=predict", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                         "debug=default", *TINY_CLI)
    run(cfg)
    pred = tmp_path / "p" / "run"
    assert (pred / "render.gif").is_file() and (pred / "depth.gif").is_file()
    assert len(list((pred / "render").glob("frame_*.png"))) == 3


def test_fast_dev_run_occupancy(make_config):
    cfg = make_config("model=nerf", "debug=fast_dev_run", *TINY_NET_CLI, *TINY_OCCUPANCY_CLI, *TINY_DATA_CLI)
    run(cfg)


class BatchShapes(L.Callback):
    seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchShapes.seen["train_rays"] = len(batch["origins"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        BatchShapes.seen["view"] = (batch["height"], batch["width"], len(batch["rgb"]))


def test_a_quick_check_renders_few_rays_and_small_views(make_config):
    """fast_dev_run asks whether everything runs: on the 64x64 built-in scene it trains on 64 rays and
    renders 16x16 views, whatever data.num_rays says."""
    BatchShapes.seen = {}
    run(make_config("model=nerf", "debug=fast_dev_run", "data.num_rays=1024", *TINY_NET_CLI, "data.scene_size=64",
                    "data.scene_views=[4,2,2]", "+callbacks.spy._target_=tests.nerf.test_train.BatchShapes"))
    assert BatchShapes.seen == {"train_rays": 64, "view": (16, 16, 256)}


def test_early_termination_skips_hidden_samples_without_changing_the_image():
    torch.manual_seed(0)
    module = NerfModule(**TINY, renderer="occupancy", march_samples=64, grid_resolution=8, early_stop_eps=0.0).eval()
    module.coarse.sigma.bias.data.fill_(20.0)  # a dense field: light is used up a few samples in
    n = 20
    batch = {"origins": torch.tensor([[0.0, 0, 4]]).expand(n, 3), "dirs": torch.nn.functional.normalize(
             torch.randn(n, 3) * 0.1 + torch.tensor([0.0, 0, -1]), dim=-1), "near": torch.full((n, 1), 2.0),
             "far": torch.full((n, 1), 6.0), "background": torch.ones(3), "aabb": torch.tensor([-1.0, -1, -1, 1, 1, 1])}
    calls = []
    module.coarse.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    full = module.render_rays(batch, perturb=False)
    module.hparams.early_stop_eps = 1e-4
    fast = module.render_rays(batch, perturb=False)
    assert calls[1] < calls[0] / 2, calls
    assert torch.allclose(full["rgb"], fast["rgb"], atol=1e-3)


def _ray_batch(n=32):
    return {"origins": torch.tensor([[0.0, 0, 4]]).expand(n, 3),
            "dirs": torch.nn.functional.normalize(torch.randn(n, 3) * 0.1 + torch.tensor([0.0, 0, -1]), dim=-1),
            "near": torch.full((n, 1), 2.0), "far": torch.full((n, 1), 6.0), "background": torch.ones(3),
            "aabb": torch.tensor([-1.0, -1, -1, 1, 1, 1]), "rgb": torch.rand(n, 3)}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    batch = _ray_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        module = NerfModule(**TINY, gradient_checkpointing=checkpointing)
        torch.manual_seed(2)
        module.training_step(batch, 0).backward()
        grads.append(module.coarse.layers[0].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("renderer", ["vanilla", "occupancy"])
def test_compiled_training_step_runs(renderer):
    module = NerfModule(**TINY, compile=True, renderer=renderer, march_samples=32, grid_resolution=8)
    for i in range(2):
        loss = module.training_step(_ray_batch(), i)
        loss.backward()
    assert torch.isfinite(loss)


def test_the_eager_vanilla_render_draws_its_samples_as_before():
    """The vanilla render became one function (compiled whole when compile is on); eager, it draws the same
    random numbers in the same order as the renderer written out step by step."""
    torch.manual_seed(0)
    module = NerfModule(**TINY)
    batch = _ray_batch()
    torch.manual_seed(3)
    out = module.render_rays(batch, perturb=True)
    torch.manual_seed(3)
    origins, dirs, near, far = (batch[k] for k in ("origins", "dirs", "near", "far"))
    viewdirs = torch.nn.functional.normalize(dirs, dim=-1)

    def shade(net, t):
        points = origins[:, None] + dirs[:, None] * t[..., None]
        raw_sigma, raw_rgb = net(points, viewdirs[:, None].expand_as(points))
        return rendering.composite(torch.sigmoid(raw_rgb), rendering.density_activation(raw_sigma), t, dirs,
                                   batch["background"])

    t = rendering.stratified_samples(near, far, TINY["num_samples"], True)
    coarse = shade(module.coarse, t)
    t_fine = rendering.sample_pdf(0.5 * (t[:, 1:] + t[:, :-1]), coarse["weights"][:, 1:-1], TINY["num_importance"],
                                  deterministic=False)
    fine = shade(module.fine, torch.sort(torch.cat([t, t_fine], -1), -1).values)
    assert torch.equal(out["rgb"], fine["rgb"]) and torch.equal(out["rgb_coarse"], coarse["rgb"])


@pytest.mark.slow
def test_the_compiled_vanilla_render_matches_eager_and_compiles_once_per_perturb():
    """model.compile=true compiles the whole vanilla render (samples, coarse, fine, compositing) as one unit:
    with midpoint samples (no random numbers) its loss and gradients are the eager ones, and later steps
    reuse the graph; random samples get a callable of their own, compiled once too."""
    torch.manual_seed(0)
    eager = NerfModule(**TINY, perturb=False)
    fast = NerfModule(**TINY, perturb=False, compile=True)
    fast.load_state_dict(eager.state_dict())
    batch = _ray_batch()
    losses = []
    for module in (eager, fast):
        losses.append(module.training_step(batch, 0))
        losses[-1].backward()
    assert torch.allclose(losses[1], losses[0], rtol=1e-5, atol=1e-8), losses
    for plain, compiled in zip(eager.parameters(), fast.parameters(), strict=True):
        assert torch.allclose(compiled.grad, plain.grad, rtol=1e-4, atol=1e-6)
    for perturb, first in ((False, 1), (True, 3)):
        fast.hparams.perturb = perturb
        fast.training_step(_ray_batch(), first).backward()  # a perturb value's first step compiles it
        counter = CompileCounter().start()
        try:
            for i in range(2):
                loss = fast.training_step(_ray_batch(), first + 1 + i)
                loss.backward()
            graphs, recompiles = counter.counts()
        finally:
            counter.stop()
        assert graphs == 0 and not recompiles and torch.isfinite(loss), (perturb, graphs, recompiles)
    assert sorted(fast._compiled) == ["vanilla_perturb=False", "vanilla_perturb=True"]


@pytest.mark.slow
def test_validation_chunks_first_do_not_make_the_training_render_dynamic():
    """Lightning's sanity check renders validation chunks before the first training step; the whole-render
    graph is compiled for static sizes all the same (the plan's dynamic=False), so a new ray count is a new
    graph rather than one symbolic graph for every size (which CUDA graphs would record per size anyway)."""
    torch.manual_seed(0)
    module = NerfModule(**TINY, compile=True)
    assert module.compile_plan().dynamic is False
    module._decide_compile("cpu")
    with torch.no_grad():
        module.render_rays(_ray_batch(48), perturb=False)   # a validation chunk
    module.training_step(_ray_batch(16), 0).backward()      # training: another size, another graph
    counter = CompileCounter().start()
    try:
        module.training_step(_ray_batch(24), 1).backward()
        graphs, _ = counter.counts()
    finally:
        counter.stop()
    assert graphs >= 1, "a third ray count reused a symbolic graph: the render was compiled dynamic"


def test_a_compiled_render_of_a_whole_view_compiles_one_chunk_shape_and_matches_eager():
    """A view's last chunk is shorter than `chunk`; compiled, it is padded to `chunk` rays so one graph renders
    every chunk of every view (a graph of its own would compile again, with CUDA graphs another recording)."""
    torch.manual_seed(0)
    eager = NerfModule(**TINY, chunk=16)
    fast = NerfModule(**TINY, chunk=16, compile=True)
    fast.load_state_dict(eager.state_dict())
    view = {k: v for k, v in _ray_batch(40).items() if k != "rgb"}  # chunks of 16, 16 and 8 rays
    fast.eval()
    eager.eval()
    fast.render_view({k: v[:16] if k in ("origins", "dirs", "near", "far") else v for k, v in view.items()})
    counter = CompileCounter().start()
    try:
        rendered = fast.render_view(view)
        graphs, recompiles = counter.counts()
    finally:
        counter.stop()
    assert graphs == 0 and not recompiles, (graphs, recompiles)
    expected = eager.render_view(view)
    for key in ("rgb", "depth", "acc"):
        assert rendered[key].shape[0] == 40
        assert torch.allclose(rendered[key], expected[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("scene, mode, best_is_tested", [("ngp", "max", False), ("blender", "min", True)])
def test_fit_tests_the_best_checkpoint_only_where_validation_has_views_of_its_own(make_config, tmp_path, caplog, scene,
                                                                                   mode, best_is_tested):
    """An instant-ngp scene holds out test views only, which validate too: the best checkpoint was chosen on
    them, so the test after fit scores the final weights. With a validation split (Blender) it scores the best.
    `monitor.mode` is chosen so that the best checkpoint is not the last (the ngp views held out are grey levels
    training never sees: PSNR falls; the Blender scene's rises): the tested weights show in test/psnr. The Blender
    scene's val and test frames are the same pictures, so their scores are comparable."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "scene"
    root = write_ngp(root, count=9) if scene == "ngp" else write_blender(root, size=16, views=(2, 2, 2))
    cfg = make_config("model=nerf", f"data.data_dir={root}", "max_epochs=3", "data.steps_per_epoch=3",
                      "data.num_rays=64", f"monitor.mode={mode}", "logger=csv", *TINY_NET_CLI, *TINY_VANILLA_CLI)
    run(cfg)
    rows = [line.split(",") for p in (tmp_path / "run" / "csv").rglob("metrics.csv") for line in p.read_text().splitlines()]
    header = rows[0]
    column = {name: [float(r[header.index(name)]) for r in rows[1:] if r[header.index(name)]]
              for name in ("val/psnr", "test/psnr")}
    val, (test,) = column["val/psnr"], column["test/psnr"]
    best = max(val) if mode == "max" else min(val)
    assert len(val) == 3 and abs(best - val[-1]) > 1e-3, f"val/psnr {val}: the best epoch must not be the last"
    assert test == pytest.approx(best if best_is_tested else val[-1], abs=1e-3)
    assert ("its test/psnr" if best_is_tested else "the final weights' test/psnr") in caplog.text  # the summary
