"""Issue 28's hash-grid training recipe as settings: trunc_exp density, the encoding tables' optimizer group,
and the experiments nerf_hashgrid_{builtin,fox,fern} with their bench.quality profiles."""
import functools
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from bench.quality import profiles
from common.task_data import TaskData
from datamodules.nerf import synthetic
from lightning_modules.nerf import NerfModule
from lightning_modules.nerf.proposal import interval_distortion
from lightning_modules.nerf.rendering import density_activation, trunc_exp
from suite.schedules import exponential
from suite.train import run
from tests.conftest import SHARED_DATA
from tests.nerf.test_hashgrid import HASH
from tests.nerf.test_train import TINY, _ray_batch, tiny_scene

HASHGRID = "lightning_modules.nerf.hashgrid.HashGridField"
EXPERIMENTS = {"builtin": [], "fox": [f"data.data_dir={SHARED_DATA / 'nerf' / 'fox'}"],
               "fern": [f"data.data_dir={SHARED_DATA / 'nerf' / 'fern'}"]}


def test_trunc_exp_is_exp_forward_with_its_gradient_clamped_at_15():
    x = torch.tensor([-20.0, -1.0, 0.0, 2.0, 15.0, 30.0], requires_grad=True)
    y = trunc_exp(x)
    assert torch.equal(y, torch.exp(x.detach()))
    y.backward(torch.full_like(y, 2.0))
    assert torch.allclose(x.grad, 2.0 * torch.exp(x.detach().clamp(-15.0, 15.0)))
    assert torch.isfinite(x.grad).all() and x.grad[-1] == x.grad[-2]  # exp(30) would be 1e13
    assert torch.equal(density_activation(x, "trunc_exp"), y)


def test_softplus_stays_the_default_density():
    raw = torch.linspace(-5, 5, 11)
    assert torch.equal(density_activation(raw), F.softplus(raw - 1.0))
    assert NerfModule(**TINY).hparams.density_activation == "softplus"
    with pytest.raises(ValueError, match="model.density_activation"):
        NerfModule(**TINY, density_activation="relu")


@pytest.mark.parametrize("kind", ["softplus", "trunc_exp"])
def test_the_occupancy_grid_reads_density_through_the_same_activation(kind):
    module = NerfModule(**TINY, renderer="occupancy", grid_resolution=4, march_samples=16, density_activation=kind)
    module.coarse.sigma.weight.data.zero_()
    module.coarse.sigma.bias.data.fill_(0.5)  # raw density 0.5 everywhere
    module.training_step(_ray_batch(8), 0)  # step 0 updates every cell of the grid
    expected = density_activation(torch.tensor(0.5), kind)
    assert torch.allclose(module.grid.density, expected.expand_as(module.grid.density))


def _occupancy_step(**kwargs):
    """A module with the occupancy renderer after one training step, its loss and the render the step made."""
    torch.manual_seed(0)
    module = NerfModule(**TINY, renderer="occupancy", grid_resolution=4, march_samples=16, **kwargs)
    render, seen = module.render_rays, {}
    module.render_rays = lambda *a, **k: seen.setdefault("out", render(*a, **k))
    torch.manual_seed(1)
    return module, module.training_step(_ray_batch(8), 0), seen["out"]


def test_the_occupancy_renderer_adds_the_distortion_loss_only_when_its_multiplier_is_set():
    module, plain, _ = _occupancy_step()
    assert module.hparams.occupancy_distortion_loss_mult == 0.0  # instant-ngp's recipe has none: runs keep their results
    module, with_loss, out = _occupancy_step(occupancy_distortion_loss_mult=0.01)
    distortion = interval_distortion(out["spacing_mids"], 1.0 / 16, out["weights"])
    assert distortion > 0 and torch.allclose(with_loss, plain + 0.01 * distortion)
    module.zero_grad()
    distortion.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.coarse.parameters())


def test_the_distortion_loss_of_jittered_march_samples_is_the_double_sum():
    torch.manual_seed(0)
    mids = (torch.arange(24) + torch.rand(5, 24)) / 24  # the occupancy march: one jittered sample a step
    weights = torch.rand(5, 24) / 12
    pairs = (weights[:, :, None] * weights[:, None, :] * (mids[:, :, None] - mids[:, None, :]).abs()).sum((1, 2))
    expected = (pairs + (weights**2 / 24).sum(-1) / 3).mean()
    assert torch.allclose(interval_distortion(mids, 1.0 / 24, weights), expected, rtol=1e-5)


def test_the_occupancy_distortion_loss_with_another_renderer_is_refused():
    with pytest.raises(ValueError, match="model.occupancy_distortion_loss_mult=0.01: a weight >= 0 for renderer=occupancy"):
        NerfModule(**TINY, occupancy_distortion_loss_mult=0.01)
    with pytest.raises(ValueError, match="occupancy_distortion_loss_mult"):
        NerfModule(**TINY, renderer="occupancy", occupancy_distortion_loss_mult=-1.0)


@pytest.mark.parametrize("renderer,override,owner", [
    ("proposal", "model.grid_resolution=128", "the occupancy renderer's setting"),
    ("vanilla", "model.proposal_net.levels=6", "the proposal renderer's setting"),
    ("occupancy", "model.num_importance=64", "the vanilla renderer's setting"),
    ("occupancy", "model.num_samples=32", "the occupancy renderer marches model.march_samples"),
])
def test_a_renderers_setting_typed_for_another_renderer_is_refused_before_the_run(make_config, renderer, override,
                                                                                  owner):
    """It would change nothing: the run stops naming the key, whose renderer it belongs to, and the user's override."""
    cfg = make_config("model=nerf", f"model.renderer={renderer}", override, "max_epochs=1")
    with pytest.raises(ValueError) as err:
        run(cfg)
    key = override.split("=")[0].rsplit(".", 1)[0] if "proposal_net" in override else override.split("=")[0]
    assert f"{key} would be ignored: {owner}" in str(err.value) and f"your override {override}" in str(err.value)
    assert not Path(cfg.paths.output_dir, "checkpoints").exists(), "refused before the run dir is made"


def test_a_renderers_own_settings_and_experiment_presets_are_accepted(make_config):
    """The fox experiments preset the occupancy grid for a user who picks that renderer: presets are not overrides."""
    from suite.config_checks import check_applicable

    check_applicable(make_config("model=nerf", "model.renderer=occupancy", "model.grid_resolution=32"))
    check_applicable(make_config("experiment=nerf_hashgrid_fox_proposal", "++data.data_dir=/data/fox", test_conf=False))


def test_the_hash_tables_are_a_group_with_a_scaled_lr_that_the_schedule_moves():
    adam = functools.partial(torch.optim.Adam, lr=1e-2, betas=(0.9, 0.99), eps=1e-15, weight_decay=1e-6)
    module = NerfModule(net=HASH, num_samples=8, num_importance=8, table_lr_scale=3.0, optimizer=adam)
    groups = module.parameter_groups()
    tables = module.table_parameters()
    assert len(tables) == 2 * len(list(module.coarse.encoding.parameters()))  # coarse and fine
    assert [id(p) for p in groups[-1]["params"]] == [id(p) for p in tables]
    assert groups[-1]["lr"] == pytest.approx(3e-2) and groups[-1]["weight_decay"] == 0.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters())  # every parameter once
    optimizer = adam(params=groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-6, 0.0, 0.0]  # MLP weights decay, only
    schedule = exponential(optimizer, total_steps=10)
    for _ in range(10):
        optimizer.step()
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # 10% at the end, as every group
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(3e-3)


def test_table_lr_scale_needs_a_field_with_tables():
    assert NerfModule(**TINY, table_lr_scale=1.0).table_parameters() == []
    with pytest.raises(ValueError, match="model.table_lr_scale=2.0.*NeRFMLP.*nerf_net=hashgrid"):
        NerfModule(**TINY, table_lr_scale=2.0)
    with pytest.raises(ValueError, match="model.table_lr_scale"):
        NerfModule(net=HASH, table_lr_scale=0.0)


def test_table_decay_adds_each_tables_mean_squared_feature_and_pulls_the_tables_to_zero():
    module = NerfModule(net=HASH, num_samples=8, num_importance=8, table_decay=0.1)
    tables = module.table_parameters()
    loss, logged = module._regularisers({})
    expected = sum(t.detach().square().mean() for t in tables)
    assert logged["train/table_decay"] == pytest.approx(float(expected)) and float(loss) == pytest.approx(0.1 * float(expected))
    loss.backward()
    for table in tables:  # the gradient of 0.1 x mean(t^2): each level's rows share one weight, 1 / its size
        assert torch.allclose(table.grad, 0.2 * table.detach() / table.numel())
    assert NerfModule(net=HASH, num_samples=8, num_importance=8)._regularisers({}) == (0.0, {})  # off by default
    with pytest.raises(ValueError, match="model.table_decay=0.1: model.net .*NeRFMLP.* has no encoding tables"):
        NerfModule(**TINY, table_decay=0.1)
    with pytest.raises(ValueError, match="model.table_decay must be >= 0"):
        NerfModule(net=HASH, table_decay=-1.0)


def test_a_model_net_that_is_not_a_nerf_field_is_refused_by_name():
    with pytest.raises(TypeError, match=r"model.net \(torch.nn.Identity\) is not a NeRF field: it lacks uses_appearance, contraction, "
                       r"table_parameters, set_aabb, set_num_images, set_pixels_across_box, set_finest_resolution, resolution_note, set_step, density \(RadianceField"):
        NerfModule(net={"_target_": "torch.nn.Identity"})  # takes any arguments, declares nothing


@pytest.mark.parametrize("scene", list(EXPERIMENTS))
def test_the_hashgrid_experiments_compose_with_the_recipe(make_config, scene):
    cfg = make_config(f"experiment=nerf_hashgrid_{scene}", *EXPERIMENTS[scene])
    assert cfg.model.net._target_ == HASHGRID and cfg.model.renderer == "occupancy"
    assert cfg.model.density_activation == "trunc_exp" and cfg.model.table_lr_scale == 1.0
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.eps) == (1e-2, [0.9, 0.99], 1e-15)
    assert cfg.optimizer.weight_decay == 1e-6 and cfg.data.num_rays == 8192
    assert cfg.trainer.max_time == {"builtin": "00:00:01:00", "fox": "00:00:02:00", "fern": "00:00:05:00"}[scene]
    assert cfg.model.grid_resolution == (64 if scene == "builtin" else 128)
    # one finest cell a pixel on the built-in scene's 64-px views (H100, s20: 30.05 dB against 29.31 at 2.5) and on
    # fern's (s22: 26.03 dB with the tables' decay, against 25.00 at 2048 cells without it)
    assert cfg.model.net.cells_per_pixel == (None if scene == "fox" else 1.0)  # None: 2.5, instant-ngp's
    assert cfg.model.table_decay == (0.3 if scene == "fern" else 0.0)  # its 17 views overfit without it (the proposal fox: 0.3)
    if scene == "fern":
        assert (cfg.data.format, cfg.data.llff_factor, cfg.data.holdout_every, cfg.data.ndc) == ("llff", 8, 8, True)
    if scene == "fox":
        assert (cfg.data.format, cfg.data.downscale) == ("ngp", 4)
    assert cfg.model.net.appearance_dim == (32 if scene == "fox" else 0)  # real photos only; fern's exposure is even
    # RGBA images (the built-in scene's) train on random background colours; the photos have no alpha
    assert cfg.data.random_background == ("auto" if scene == "builtin" else False)


def test_each_hashgrid_quality_profile_has_the_mlp_beside_it_at_the_same_budget(make_config):
    by_name = {p["name"]: p for p in profiles("nerf")}
    for scene in EXPERIMENTS:
        grid, mlp = by_name[f"hashgrid_{scene}"], by_name[f"mlp_{scene}"]
        assert grid["budgets"] == mlp["budgets"] and "test/ssim" in grid["metrics"] and "test/psnr" in mlp["metrics"]
        cfg = make_config(*(o.replace("{data}", str(SHARED_DATA)) for o in mlp["overrides"]))
        assert cfg.model.net._target_.endswith("NeRFMLP") and cfg.model.renderer == "occupancy"
        assert cfg.optimizer.lr == 5e-4 and cfg.model.density_activation == "softplus" and cfg.data.num_rays == 8192
        assert cfg.model.net.appearance_dim == 0  # the fox's appearance vectors are the hash grid's
        assert cfg.model.net.level_warmup_steps == 0  # nor has it levels to warm up
        built = {}
        for row in (grid, mlp):  # what bench.quality starts builds
            cfg = make_config(*(o.replace("{data}", str(SHARED_DATA)) for o in row["overrides"]))
            built[row["name"]] = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer),
                                             scheduler=instantiate(cfg.scheduler))
        # few views: every hash-grid experiment warms its levels up
        assert built[grid["name"]].coarse.level_warmup_steps == 1000


class OptimizerGroups(L.Callback):
    seen: list = []
    backgrounds: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        OptimizerGroups.seen = [(g["lr"], g["weight_decay"], g.get("name")) for g in trainer.optimizers[0].param_groups]
        OptimizerGroups.backgrounds.append(tuple(batch["background"].shape))


def test_the_builtin_hashgrid_experiment_runs(make_config):
    OptimizerGroups.seen, OptimizerGroups.backgrounds = [], []
    # a 32^3 grid: the first step queries every cell through the full-size hash grid, slow on a CPU
    run(make_config("experiment=nerf_hashgrid_builtin", "debug=fast_dev_run", "model.grid_resolution=32",
                    "+callbacks.spy._target_=tests.nerf.test_recipe.OptimizerGroups"))
    assert OptimizerGroups.seen == [(1e-2, 1e-6, None), (1e-2, 0.0, None), (1e-2, 0.0, "encoding_tables")]
    assert OptimizerGroups.backgrounds[-1] == (64, 3)  # a random colour for each of fast_dev_run's 64 rays


@pytest.mark.parametrize("scene", ["fox", "fern"])
def test_the_real_scene_hashgrid_experiments_run(make_config, scene):
    if not (SHARED_DATA / "nerf" / scene).is_dir():
        pytest.skip(f"{SHARED_DATA / 'nerf' / scene} is not here (the shared data folder beside the checkout)")
    # a 16^3 grid: the experiment's 128^3 one costs a CPU over a minute of density queries at the first step
    run(make_config(f"experiment=nerf_hashgrid_{scene}", *EXPERIMENTS[scene], "debug=fast_dev_run",
                    "model.grid_resolution=16"))


def test_a_hash_grid_far_finer_than_the_training_pixels_is_flagged_at_start_with_a_resolution_that_fits(
        tmp_path, caplog):
    data = tiny_scene(tmp_path, steps_per_epoch=1).task_data()
    focal = 0.5 * 16 / math.tan(0.5 * synthetic.CAMERA_ANGLE_X)  # 16-pixel views
    assert data.pixels_across_box == pytest.approx(3.0 * focal / 4.0, rel=1e-4)  # the 3-unit box from radius 4
    with caplog.at_level(logging.INFO, logger="lightning_modules.nerf.module"):
        NerfModule(net={**HASH, "finest_resolution": 2048}).bind_data(data)
        fine = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(fine) == 1 and "2048 finest cells across the scene box, 17 training pixels" in fine[0].message
        assert "model.net.finest_resolution=42" in fine[0].message  # 2.5 cells a pixel
        caplog.clear()
        NerfModule(net={**HASH, "contraction": "l2", "finest_resolution": 2048}).bind_data(data)
        assert "model.net.finest_resolution=83" in caplog.records[-1].message  # the box fills half the cube
        caplog.clear()
        NerfModule(net=HASH).bind_data(data)  # 32 cells
        assert [r.levelno for r in caplog.records] == [logging.INFO] and "1.9 cells a pixel" in caplog.text
        caplog.clear()
        NerfModule(**TINY).bind_data(data)  # the MLP has no cells
        NerfModule(net=HASH).bind_data(TaskData())  # data with no views says nothing of its pixels
        assert not caplog.records
