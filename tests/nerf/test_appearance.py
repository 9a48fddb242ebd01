"""Per-image appearance vectors (issue 28, NeRF-W / nerfacto): `model.net.appearance_dim` on the hash-grid field
gives each training image a learned vector that its rays' colour reads and their density does not."""
import lightning as L
import pytest
import torch

from common.task_data import TaskData
from datamodules.nerf import NerfDataModule
from datamodules.nerf.datamodule import RayBatches
from lightning_modules.nerf import NerfModule
from suite.config_checks import ConfigError
from suite.train import run
from tests.nerf.test_hashgrid import HASH
from tests.nerf.test_train import _ray_batch, tiny_scene

APPEARANCE = {**HASH, "appearance_dim": 4}
MLP = {"_target_": "lightning_modules.nerf.network.NeRFMLP", "depth": 2, "width": 16, "skips": [1], "pos_freqs": 2,
       "dir_freqs": 2}


def _module(renderer="vanilla", num_images=3, **kwargs):
    torch.manual_seed(0)
    module = NerfModule(net=APPEARANCE, num_samples=16, num_importance=8, renderer=renderer, march_samples=32,
                        grid_resolution=8, **kwargs).eval()
    module.bind_data(TaskData(num_train_images=num_images))
    return module


@pytest.mark.parametrize("renderer", ["vanilla", "occupancy"])
def test_a_rays_colour_follows_its_images_vector_and_its_density_does_not(renderer):
    module = _module(renderer)
    with torch.no_grad():
        for net in (module.coarse, module.fine):
            if net is not None:
                net.appearance.weight[0].fill_(-3.0)  # image 0 "dark", image 1 "bright"
                net.appearance.weight[1].fill_(3.0)
    batch = _ray_batch(16)
    renders = []
    for image in (0, 1):
        renders.append(module.render_rays({**batch, "image": torch.full((16,), image)}, perturb=False))
    dark, bright = renders
    assert (dark["rgb"] - bright["rgb"]).abs().max() > 1e-3
    assert torch.equal(dark["acc"], bright["acc"]) and torch.equal(dark["depth"], bright["depth"])
    field, points = module.coarse, torch.rand(32, 3) * 2 - 1
    views = torch.nn.functional.normalize(torch.randn(32, 3), dim=-1)
    sigma_a, rgb_a = field(points, views, torch.zeros(32, dtype=torch.long))
    sigma_b, rgb_b = field(points, views, torch.ones(32, dtype=torch.long))
    assert torch.equal(sigma_a, sigma_b) and torch.equal(sigma_a, field.density(points))
    assert not torch.allclose(rgb_a, rgb_b)


def test_training_rays_carry_the_index_of_the_image_they_came_from(tmp_path):
    dm = NerfDataModule(cache_dir=str(tmp_path / "scene"), scene_size=8, scene_views=(5, 1, 1), num_rays=200)
    dm.prepare_data()
    dm.setup("fit")
    train = dm.scene.splits["train"]
    assert dm.task_data().num_train_images == len(train) == 5
    buffer = dm.ray_buffer
    assert buffer["image"].dtype == torch.int64 and buffer["image"].shape == buffer["origins"].shape[:1]
    per_view = train.height * train.width
    for i in range(len(train)):
        rows = slice(i * per_view, (i + 1) * per_view)
        assert (buffer["image"][rows] == i).all()
        # a Blender camera's rays all start at its centre: these rows are view i's rays
        assert torch.allclose(buffer["origins"][rows], train.c2w[i, :3, 3].float().expand(per_view, 3))
    batch = RayBatches(buffer, 200)[0]
    assert batch["image"].dtype == torch.int64 and batch["image"].shape == (200,)
    assert len(batch["image"].unique()) > 1
    assert torch.allclose(batch["origins"], train.c2w[batch["image"], :3, 3].float())


def test_a_held_out_photo_takes_the_vector_of_the_training_photo_taken_nearest(tmp_path):
    """Photos taken near each other share their light and exposure: a held-out view's rays carry the index of
    the training camera nearest to its own (from the poses, never its pixels); camera paths carry none."""
    dm = tiny_scene(tmp_path, steps_per_epoch=1)
    train_centres = dm.load_scene().splits["train"].c2w[:, :3, 3]
    for split, loader in (("test", dm.test_dataloader()), ("val", dm.val_dataloader())):
        views = dm.load_scene().splits[split]
        for i, batch in enumerate(loader):
            nearest = min(range(len(train_centres)), key=lambda j: float((train_centres[j] - views.c2w[i, :3, 3]).norm()))
            assert batch["image"].dtype == torch.long and (batch["image"] == nearest).all(), (split, i)
            assert batch["image"].shape == batch["origins"].shape[:1]
    dm.setup("predict")
    assert "image" not in next(iter(dm.predict_dataloader()))
    module = _module(num_images=len(train_centres))
    with torch.no_grad():
        module.coarse.appearance.weight.normal_()
        module.fine.appearance.weight.normal_()
    view = next(iter(dm.test_dataloader()))
    rendered = module.render_view(view)["rgb"]
    expected = module.render_rays(view, perturb=False)["rgb"]  # the same rays, the same image index
    assert torch.allclose(rendered, expected, atol=1e-6)
    mean = module.render_view({k: v for k, v in view.items() if k != "image"})["rgb"]
    assert not torch.allclose(rendered, mean, atol=1e-4)


def test_a_camera_path_view_renders_with_the_mean_of_the_training_vectors():
    module = _module(num_images=4)
    view = {k: v for k, v in _ray_batch(12).items() if k != "rgb"}  # a camera path's rays: no image index
    with torch.no_grad():
        for net in (module.coarse, module.fine):
            net.appearance.weight.add_(1.0)  # a mean far from zero, so zeros would render otherwise
    held_out = module.render_view(view)
    mean_module = _module(num_images=4)
    mean_module.load_state_dict(module.state_dict())
    with torch.no_grad():
        for net in (mean_module.coarse, mean_module.fine):
            net.appearance.weight.copy_(net.appearance.weight.mean(0).expand_as(net.appearance.weight))
    as_mean = mean_module.render_rays({**view, "image": torch.zeros(12, dtype=torch.long)}, perturb=False)
    assert torch.allclose(held_out["rgb"], as_mean["rgb"], atol=1e-6)
    with torch.no_grad():
        for net in (mean_module.coarse, mean_module.fine):
            net.appearance.weight.zero_()
    as_zero = mean_module.render_rays({**view, "image": torch.zeros(12, dtype=torch.long)}, perturb=False)
    assert not torch.allclose(held_out["rgb"], as_zero["rgb"], atol=1e-4)


def test_a_checkpoint_brings_its_vectors_back_without_the_data(tmp_path):
    """load_from_checkpoint (and init_from) load weights before any data is bound: the vectors are built
    from the checkpoint's size, and data with another number of images is refused."""
    module = _module(num_images=5)
    with torch.no_grad():
        module.coarse.appearance.weight.normal_()
    path = tmp_path / "appearance.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    loaded = NerfModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.coarse.appearance.weight, module.coarse.appearance.weight)
    assert torch.equal(loaded.fine.appearance.weight, module.fine.appearance.weight)
    loaded.bind_data(TaskData(num_train_images=5))  # the same images: the loaded vectors stay
    assert torch.equal(loaded.coarse.appearance.weight, module.coarse.appearance.weight)
    with pytest.raises(ValueError, match="appearance vectors for 5 training images but the data has 7"):
        loaded.bind_data(TaskData(num_train_images=7))


def test_training_without_image_indices_is_refused():
    with pytest.raises(KeyError, match="image"):
        _module().train().training_step(_ray_batch(8), 0)


class AppearanceGradients(L.Callback):
    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grad = pl_module.coarse.appearance.weight.grad
        AppearanceGradients.seen = {"rows": pl_module.coarse.appearance.num_embeddings,
                                    "touched": set(torch.nonzero(grad.abs().sum(-1)).flatten().tolist()),
                                    "batch": set(batch["image"].tolist())}


def test_the_builtin_hashgrid_experiment_runs_with_appearance_vectors(make_config):
    AppearanceGradients.seen = {}
    run(make_config("experiment=nerf_hashgrid_builtin", "model.net.appearance_dim=8", "debug=fast_dev_run",
                    "model.grid_resolution=32", "+callbacks.spy._target_=tests.nerf.test_appearance.AppearanceGradients"))
    seen = AppearanceGradients.seen
    assert seen["rows"] == 40  # the built-in scene's training views
    assert seen["touched"] and seen["touched"] <= seen["batch"]  # a step trains the vectors of its rays' images


def test_appearance_vectors_with_the_mlp_field_are_refused_as_a_hash_grid_setting(make_config):
    message = r"model.net.appearance_dim=32: .* a hash-grid setting \(nerf_net=hashgrid"
    with pytest.raises(ValueError, match=message):
        NerfModule(net={**MLP, "appearance_dim": 32})
    with pytest.raises(ConfigError, match=message):
        run(make_config("model=nerf", "model.net.appearance_dim=32", "debug=fast_dev_run"))
    assert not NerfModule(net=MLP, num_importance=4).coarse.uses_appearance
