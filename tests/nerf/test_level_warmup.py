"""The hash grid's coarse-to-fine level warm-up (model.net.level_warmup_steps): which levels a step sees,
what a checkpoint keeps, and the module driving it from the training step."""
import pytest
import torch
from hydra.utils import instantiate

from lightning_modules.nerf import NerfModule
from lightning_modules.nerf.hashgrid import HashGridField
from lightning_modules.nerf.network import NeRFMLP
from tests.nerf.test_hashgrid import HASH
from tests.nerf.test_train import _ray_batch


def _field(**kwargs):
    return HashGridField(levels=4, log2_table_size=8, base_resolution=2, finest_resolution=16, hidden=8,
                         features_per_level=2, **kwargs)


def _table_grads(field, points):
    field.zero_grad(set_to_none=True)
    raw, _ = field(points, torch.nn.functional.normalize(points, dim=-1))
    raw.sum().backward()
    return [None if t.grad is None else t.grad.abs().sum().item() for t in field.encoding.tables]


def test_the_finer_levels_fade_in_over_the_warm_up_and_untouched_ones_learn_nothing():
    torch.manual_seed(0)
    field = _field(level_warmup_steps=10, level_warmup_start=1)
    field.set_aabb(torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    points = torch.rand(256, 3) * 2 - 1
    field.set_step(0)  # the coarsest level alone
    assert field.level_mask.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    grads = _table_grads(field, points)
    assert grads[0] > 0 and grads[1:] == [0.0, 0.0, 0.0]  # the fine tables get no signal yet
    field.set_step(5)  # active = 1 + 3 * 0.5 = 2.5: level 1 on, level 2 at half weight
    assert field.level_mask.tolist() == [1, 1, 1, 1, 0.5, 0.5, 0, 0]
    field.set_step(10)
    assert field.level_mask.tolist() == [1] * 8 and all(g > 0 for g in _table_grads(field, points))
    field.set_step(3)  # a step is a function of itself alone (a resumed run sets the step it resumes at)
    assert field.level_mask.tolist() == pytest.approx([1, 1, 0.9, 0.9, 0, 0, 0, 0])  # active 1.9


def test_without_a_warm_up_every_level_is_on_from_the_first_step():
    field = _field()
    field.set_step(0)
    assert field.level_mask.tolist() == [1] * 8


def test_a_checkpoint_taken_mid_warm_up_renders_as_it_trained():
    torch.manual_seed(0)
    trained = _field(level_warmup_steps=10, level_warmup_start=2)
    trained.set_aabb(torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    with torch.no_grad():
        for table in trained.encoding.tables:
            table.normal_()
    trained.set_step(2)
    points = torch.rand(64, 3) * 2 - 1
    fresh = _field(level_warmup_steps=10, level_warmup_start=2)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.density(points), trained.density(points))
    older = trained.state_dict()
    del older["level_mask"]  # a checkpoint from before the warm-up existed: every level on
    plain = _field()
    plain.load_state_dict(older)
    assert plain.level_mask.tolist() == [1] * 8


def test_a_bad_warm_up_setting_is_refused_naming_the_key():
    for steps in (-1, 0.5, 1000.5, "abc", None):  # 0.5 must not turn into 0: a warm-up silently off
        with pytest.raises(ValueError, match="model.net.level_warmup_steps must be an integer"):
            _field(level_warmup_steps=steps)
    for start in (0, 5, 2.5):
        with pytest.raises(ValueError, match=r"level_warmup_start an integer within 1..4"):
            _field(level_warmup_steps=10, level_warmup_start=start)


def test_switching_a_hash_grid_experiment_to_the_mlp_names_the_warm_up(make_config):
    cfg = make_config("experiment=nerf_hashgrid_builtin", "nerf_net=mlp")
    with pytest.raises(Exception, match=r"model.net.level_warmup_steps=1000: the level warm-up is a hash-grid "
                                        r"setting .* or model.net.level_warmup_steps=0"):
        instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    cfg = make_config("experiment=nerf_hashgrid_builtin", "nerf_net=mlp", "model.net.level_warmup_steps=0")
    with pytest.raises(Exception, match=r"model.net.cells_per_pixel=1.0: the finest grid cells' size is a hash-grid "
                                        r"setting .* or model.net.cells_per_pixel=null"):
        instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    cfg = make_config("experiment=nerf_hashgrid_builtin", "nerf_net=mlp", "model.net.level_warmup_steps=0",
                      "model.net.cells_per_pixel=null")
    assert isinstance(instantiate(cfg.model, optimizer=instantiate(cfg.optimizer)).coarse, NeRFMLP)


def test_the_mlp_field_takes_a_warm_up_of_0_and_names_any_other(make_config):
    """docs/tasks/nerf.md: with nerf_net=mlp any value but 0 is an error that says so (not Hydra's unknown key)."""
    cfg = make_config("model=nerf", "model.net.level_warmup_steps=0")
    assert isinstance(instantiate(cfg.model, optimizer=instantiate(cfg.optimizer)).coarse, NeRFMLP)
    cfg = make_config("model=nerf", "model.net.level_warmup_steps=100")
    with pytest.raises(Exception, match=r"model.net.level_warmup_steps=100: the level warm-up is a hash-grid setting"):
        instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))


def test_the_occupancy_grid_reads_the_density_of_the_step_it_updates_for():
    module = NerfModule(net={**HASH, "level_warmup_steps": 100, "level_warmup_start": 1}, renderer="occupancy",
                        num_samples=8, march_samples=16, grid_resolution=8)
    assert module.coarse.level_mask.tolist() == [1, 1] + [0] * 6  # built at step 0's: the sanity check renders it
    module.coarse.set_step(50)  # as the step before left it, were that step 50
    seen = []
    update = module.grid.maybe_update
    module.grid.maybe_update = lambda density: seen.append(module.coarse.level_mask.tolist()) or update(density)
    module.training_step(_ray_batch(), 0)
    assert seen == [[1, 1] + [0] * 6]


def test_the_training_step_sets_the_warm_up_of_every_field():
    module = NerfModule(net={**HASH, "level_warmup_steps": 100, "level_warmup_start": 1}, num_samples=8,
                        num_importance=8)
    module.training_step(_ray_batch(), 0)
    for field in (module.coarse, module.fine):
        assert field.level_mask.tolist() == [1, 1] + [0] * 6  # global_step 0: the coarsest level alone
