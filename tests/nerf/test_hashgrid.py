"""The hash-grid field (issue 28): the encoding against hand-computed lookups, contraction, the SH
basis, learning on the tiny scene, and a hash-grid run resuming exactly."""
import math

import pytest
import torch

from common.task_data import TaskData
from lightning_modules.nerf import NerfModule
from lightning_modules.nerf.contraction import contract
from lightning_modules.nerf.hashgrid import (
    MAX_FINEST,
    PRIMES,
    HashEncoding,
    HashGridField,
    sh_encoding,
)
from suite.train import run
from tests.conftest import compose_config
from tests.nerf.test_train import TINY_DATA_CLI, TINY_VANILLA_CLI, tiny_scene, train_on_tiny_scene

HASH = {"_target_": "lightning_modules.nerf.hashgrid.HashGridField", "levels": 4, "log2_table_size": 10,
        "base_resolution": 4, "finest_resolution": 32, "hidden": 16, "color_hidden": 16}
HASH_CLI = ["nerf_net=hashgrid", "model.net.levels=4", "model.net.log2_table_size=10", "model.net.base_resolution=4",
            "model.net.finest_resolution=32", "model.net.hidden=16", "model.net.color_hidden=16",
            *TINY_DATA_CLI]  # the tiny scene; each test adds its renderer's settings


def _hand_trilinear(point, res):
    """Corner coordinates and weights, written out per corner as in a textbook."""
    pos = [c * res for c in point]
    low = [min(math.floor(p), res - 1) for p in pos]
    frac = [p - lo for p, lo in zip(pos, low, strict=True)]
    corners, weights = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                corners.append((low[0] + dx, low[1] + dy, low[2] + dz))
                w = 1.0
                for bit, f in zip((dx, dy, dz), frac, strict=True):
                    w *= f if bit else 1 - f
                weights.append(w)
    return corners, weights


def test_a_hashed_level_looks_up_the_hand_computed_rows():
    enc = HashEncoding(levels=1, log2_table_size=4, features_per_level=2, base_resolution=8, finest_resolution=8)
    assert enc.resolutions == [8] and enc.dense == [False]  # 9^3 vertices > 16 rows: hashed
    with torch.no_grad():
        enc.tables[0].copy_(torch.arange(32.0).reshape(16, 2))
    point = (0.3, 0.55, 0.9)  # pos (2.4, 4.4, 7.2): corners (2..3, 4..5, 7..8)
    corners, weights = _hand_trilinear(point, 8)
    rows = [(x * PRIMES[0] ^ y * PRIMES[1] ^ z * PRIMES[2]) % 16 for x, y, z in corners]
    index, w = enc.lookup(torch.tensor([point]), 0)
    assert index[0].tolist() == rows
    assert torch.allclose(w[0], torch.tensor(weights), atol=1e-6) and w.sum().item() == pytest.approx(1.0)
    expected = sum(wt * enc.tables[0][r] for wt, r in zip(weights, rows, strict=True))
    assert torch.allclose(enc(torch.tensor([point]))[0], expected, atol=1e-5)


def test_a_dense_level_indexes_vertices_directly():
    enc = HashEncoding(levels=1, log2_table_size=10, features_per_level=1, base_resolution=4, finest_resolution=4)
    assert enc.dense == [True] and enc.tables[0].shape == (125, 1)  # 5^3 vertices fit 1024 rows
    with torch.no_grad():
        enc.tables[0].copy_(torch.arange(125.0)[:, None])
    point = (0.1, 0.6, 1.0)  # x = 1 lies in the last cell at weight 1
    corners, weights = _hand_trilinear(point, 4)
    rows = [x + 5 * (y + 5 * z) for x, y, z in corners]
    index, _ = enc.lookup(torch.tensor([point]), 0)
    assert index[0].tolist() == rows
    assert enc(torch.tensor([point])).item() == pytest.approx(sum(w * r for w, r in zip(weights, rows, strict=True)),
                                                              rel=1e-5)


def test_levels_grow_geometrically_and_gradients_reach_only_the_touched_rows():
    enc = HashEncoding(levels=3, log2_table_size=6, base_resolution=2, finest_resolution=8)
    assert enc.resolutions == [2, 4, 8] and enc.out_dim == 6
    point = torch.tensor([[0.3, 0.55, 0.9]])
    enc(point).sum().backward()
    for level, table in enumerate(enc.tables):
        touched = set(enc.lookup(point, level)[0][0].tolist())
        nonzero = set(torch.nonzero(table.grad.abs().sum(-1)).flatten().tolist())
        assert nonzero and nonzero <= touched, (level, nonzero, touched)


@pytest.mark.parametrize("kind", ["l2", "linf"])
def test_contraction(kind):
    inside = torch.tensor([[0.3, -0.2, 0.5], [0.0, 0.0, 0.0]])
    assert torch.equal(contract(inside, kind), inside)
    norm = (lambda x: x.norm(dim=-1)) if kind == "l2" else (lambda x: x.abs().amax(-1))
    direction = torch.tensor([[1.0, 2.0, -0.5]])
    at_two = direction * 2 / norm(direction)
    out = contract(at_two, kind)
    assert norm(out).item() == pytest.approx(1.5)
    assert torch.allclose(out / norm(out), at_two / norm(at_two))  # the direction is kept
    assert 1.999 < norm(contract(direction * 1e4, kind)).item() < 2.0
    assert torch.equal(contract(direction, "none"), direction)
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0, 0]], requires_grad=True)
    contract(x, kind).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_spherical_harmonics_of_degree_4():
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(100000, 3), dim=-1)
    sh = sh_encoding(dirs, 4)
    assert sh.shape == (100000, 16)
    assert torch.all(sh[:, 0] == sh[0, 0]) and sh[0, 0].item() == pytest.approx(0.5 / math.sqrt(math.pi))
    # orthonormal on the sphere: a Monte-Carlo estimate of the Gram matrix is the identity
    gram = 4 * math.pi * sh.T @ sh / len(dirs)
    assert torch.allclose(gram, torch.eye(16), atol=0.05), gram


def test_points_outside_the_box_have_zero_density_and_the_field_is_a_drop_in():
    from lightning_modules.nerf.rendering import density_activation

    field = HashGridField(levels=2, log2_table_size=8, base_resolution=2, finest_resolution=4, hidden=8)
    field.set_aabb(torch.tensor([-2.0, -2, -2, 2, 2, 2]))
    points = torch.tensor([[0.0, 0, 0], [1.9, -1.9, 0.5], [2.5, 0, 0], [0, 0, -9.0]])
    sigma, rgb = field(points, torch.nn.functional.normalize(torch.ones(4, 3), dim=-1))
    assert sigma.shape == (4,) and rgb.shape == (4, 3)
    activated = density_activation(sigma)
    assert (activated[:2] > 0).all() and (activated[2:] == 0).all()
    assert torch.equal(field.density(points), sigma)
    contracted = HashGridField(levels=2, log2_table_size=8, base_resolution=2, finest_resolution=4, contraction="l2")
    assert (density_activation(contracted.density(points * 100)) > 0).all()  # unbounded: nothing is outside
    with pytest.raises(ValueError, match="contraction"):
        HashGridField(contraction="sphere")


@pytest.mark.parametrize("renderer", ["vanilla", pytest.param("occupancy", marks=pytest.mark.slow)])
def test_psnr_rises_on_a_tiny_scene_with_the_hash_field(tmp_path, renderer):
    torch.manual_seed(0)
    dm = tiny_scene(tmp_path, steps_per_epoch=40)
    module = NerfModule(net=HASH, num_samples=24, num_importance=0, renderer=renderer, march_samples=48,
                        grid_resolution=16, grid_warmup_steps=20, grid_update_every=8)
    before, after, last = train_on_tiny_scene(module, dm, lr=1e-2)
    assert torch.equal(module.coarse.aabb, last["aabb"].float())  # the field lives in the data's scene box
    assert after > before + 3.0, (before, after)


# with `auto` the tables are sized from the data: predict, whose model is built before any data, rebuilds them;
# the level warm-up (10 steps) is cut mid-way
@pytest.mark.parametrize(("appearance_dim", "finest", "warmup"), [(0, "32", 0), (4, "auto", 10)])
def test_a_hash_grid_run_resumes_exactly(tmp_path, appearance_dim, finest, warmup):
    net = (*(s if not s.startswith("model.net.finest_resolution=") else f"model.net.finest_resolution={finest}"
             for s in (*HASH_CLI, *TINY_VANILLA_CLI)), f"model.net.appearance_dim={appearance_dim}", f"model.net.level_warmup_steps={warmup}",
           "model.net.level_warmup_start=1")
    exact = ("model=nerf", *net, "deterministic=true", "max_epochs=2", "data.steps_per_epoch=4",
             "trainer.log_every_n_steps=1")
    run(compose_config(tmp_path / "ref", *exact))
    reference = torch.load(tmp_path / "ref" / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                           weights_only=True)["state_dict"]
    assert any(k.startswith("coarse.encoding.tables.") for k in reference)  # the tables are checkpointed
    if appearance_dim:  # and the vectors of the tiny scene's 6 training images, in both networks
        assert reference["coarse.appearance.weight"].shape == reference["fine.appearance.weight"].shape == (6, 4)
    # stopped by a signal mid-epoch (max_steps would change the exponential schedule's length)
    stop = ("+callbacks.stop._target_=tests.training_helpers.SignalAt", "+callbacks.stop.step=6")
    with pytest.raises(SystemExit):
        run(compose_config(tmp_path / "cut", *exact, *stop))
    last = tmp_path / "cut" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 7
    run(compose_config(tmp_path / "cut", *exact, "resume=true"))
    resumed = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert resumed.keys() == reference.keys()
    for name in resumed:
        assert torch.equal(resumed[name], reference[name]), name
    # the checkpoint rebuilds the hash field for rendering (mode=predict takes the net from it)
    run(compose_config(tmp_path / "p", "model=nerf", "mode=predict", f"ckpt_path={last}", "debug=default", *net))
    assert (tmp_path / "p" / "run" / "render.gif").is_file()


def test_gradient_checkpointing_gives_the_same_gradients_with_the_hash_field():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        field = HashGridField(levels=2, log2_table_size=8, base_resolution=2, finest_resolution=4, hidden=8,
                              gradient_checkpointing=checkpointing)
        points = torch.rand(64, 3) * 2 - 1
        sigma, rgb = field(points, torch.nn.functional.normalize(torch.randn(64, 3), dim=-1))
        (sigma.sum() + rgb.sum()).backward()
        grads.append([p.grad.clone() for p in field.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.slow
def test_the_hash_field_compiles():
    from tests.nerf.test_train import _ray_batch

    module = NerfModule(net=HASH, num_samples=8, num_importance=8, compile=True)
    for i in range(2):
        loss = module.training_step(_ray_batch(), i)
        loss.backward()
    assert torch.isfinite(loss)


def _auto_field(**kwargs):
    return HashGridField(levels=3, log2_table_size=8, base_resolution=4, finest_resolution="auto", hidden=8, **kwargs)


def test_an_auto_finest_resolution_gives_two_and_a_half_cells_a_training_pixel():
    field = _auto_field()
    assert field.encoding.resolutions[-1] == MAX_FINEST  # before the data says otherwise
    field.set_pixels_across_box(10.0)
    assert field.encoding.resolutions[-1] == 25 and field.cells_across_box() == 25
    contracted = _auto_field(contraction="l2")
    contracted.set_pixels_across_box(10.0)
    assert contracted.cells_across_box() == 25  # the box is half the contracted cube: 50 cells a side
    for pixels, finest in ((1e5, MAX_FINEST), (0.5, 4), (None, MAX_FINEST)):  # capped, floored at base, no scale
        field.set_pixels_across_box(pixels)
        assert field.encoding.resolutions[-1] == finest
    with pytest.raises(ValueError, match="model.net.finest_resolution must be an integer or auto"):
        HashGridField(finest_resolution="fine")


def test_cells_per_pixel_scales_the_auto_finest_resolution_and_is_refused_where_it_cannot_apply():
    coarse = _auto_field(cells_per_pixel=1.0)
    coarse.set_pixels_across_box(10.0)
    assert coarse.encoding.resolutions[-1] == 10 and coarse.cells_across_box() == 10
    assert HashGridField(levels=3, log2_table_size=8, finest_resolution=64, cells_per_pixel=None).encoding.resolutions[-1] == 64
    with pytest.raises(ValueError, match="model.net.cells_per_pixel=0.0: finest cells a training pixel must be a number > 0"):
        HashGridField(levels=3, log2_table_size=8, finest_resolution="auto", cells_per_pixel=0.0)
    with pytest.raises(ValueError, match="model.net.cells_per_pixel=1.0 sizes .*finest_resolution=64 set model.net.cells_per_pixel=null"):
        HashGridField(levels=3, log2_table_size=8, finest_resolution=64, cells_per_pixel=1.0)
    with pytest.raises(ValueError, match="model.net.cells_per_pixel=1.0: this data has no pixel scale"):
        coarse.set_pixels_across_box(None)  # data with no views: auto is 2048 there whatever the scale says
    default = _auto_field()
    default.set_pixels_across_box(None)
    assert default.encoding.resolutions[-1] == MAX_FINEST


def test_tables_loaded_from_a_checkpoint_keep_their_resolution_when_the_data_would_size_them_otherwise():
    """init_from: the weights load before the data binds; resizing them to the new data's auto resolution would
    replace the trained tables with fresh ones."""
    trained = _auto_field()
    trained.set_pixels_across_box(10.0)  # 25 cells
    with torch.no_grad():
        for table in trained.encoding.tables:
            table.fill_(0.5)
    loaded = _auto_field()
    loaded.load_state_dict(trained.state_dict())
    loaded.set_pixels_across_box(40.0)  # would be 100 cells for fresh tables
    assert loaded.encoding.resolutions == trained.encoding.resolutions
    assert all(torch.equal(a, b) for a, b in zip(loaded.encoding.tables, trained.encoding.tables, strict=True))


def test_a_set_finest_resolution_that_differs_from_a_checkpoints_is_refused_and_auto_takes_the_checkpoints():
    trained = _auto_field()
    trained.set_pixels_across_box(10.0)  # 25 cells
    fixed = HashGridField(levels=3, log2_table_size=8, base_resolution=4, finest_resolution=64, hidden=8)
    with pytest.raises(ValueError, match="model.net.finest_resolution=64, but the checkpoint's tables have 25 cells a "
                                         "side.*set model.net.finest_resolution=25, or auto"):
        fixed.load_state_dict(trained.state_dict())
    same = HashGridField(levels=3, log2_table_size=8, base_resolution=4, finest_resolution=25, hidden=8)
    same.load_state_dict(trained.state_dict())
    assert same.encoding.resolutions == trained.encoding.resolutions


def test_a_checkpoint_loaded_after_the_data_bound_says_the_resolution_its_tables_render_at(caplog):
    """mode=test ckpt_path=...: setup sizes the grid from the data, then the checkpoint's tables replace it."""
    module = NerfModule(net={**HASH, "finest_resolution": "auto"}, num_samples=8, num_importance=8)
    module.bind_data(TaskData(pixels_across_box=12.0))  # 30 cells
    state = {k: v for k, v in module.state_dict().items()}
    state["coarse.finest_resolution"] = torch.tensor(24)
    with caplog.at_level("INFO"):
        module.on_load_checkpoint({"state_dict": state})
    assert module.coarse.encoding.resolutions[-1] == 24
    assert "the checkpoint's tables: hash grid: 24 finest cells across the scene box, 12 training pixels" in caplog.text


def test_a_module_sizes_an_auto_grid_from_its_data(caplog):
    module = NerfModule(net={**HASH, "finest_resolution": "auto"}, num_samples=8, num_importance=8)
    with caplog.at_level("INFO"):
        module.bind_data(TaskData(pixels_across_box=12.0))
    assert module.coarse.encoding.resolutions[-1] == 30 and module.fine.encoding.resolutions[-1] == 30
    assert "30 finest cells across the scene box, 12 training pixels (2.5 cells a pixel)" in caplog.text


def test_a_checkpoint_of_an_auto_grid_loads_into_a_field_not_yet_sized():
    trained = _auto_field()
    trained.set_pixels_across_box(10.0)
    with torch.no_grad():
        for table in trained.encoding.tables:
            table.normal_()
    fresh = _auto_field()  # what load_from_checkpoint builds before any data is bound
    fresh.load_state_dict(trained.state_dict())
    assert fresh.encoding.resolutions == trained.encoding.resolutions
    assert all(torch.equal(a, b) for a, b in zip(fresh.encoding.tables, trained.encoding.tables, strict=True))
    older = trained.state_dict()
    del older["finest_resolution"]  # a checkpoint from before the resolution was stored, built with an integer
    fixed = HashGridField(levels=3, log2_table_size=8, base_resolution=4, finest_resolution=25, hidden=8)
    fixed.load_state_dict(older)
    assert torch.equal(fixed.encoding.tables[-1], trained.encoding.tables[-1])
