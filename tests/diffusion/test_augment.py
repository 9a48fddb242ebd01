"""data.augment of the diffusion task: random horizontal flips of training images, never of held-out
ones; off by default (digits); the old data.random_flip of stored configs still builds."""
import numpy as np
import pytest
import torch

from datamodules.diffusion import DiffusionDataModule


def make_dm(tmp_path, **kw) -> DiffusionDataModule:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    dm = DiffusionDataModule(loader={"batch_size": 32, "num_workers": 0}, data_dir=str(tmp_path / "images.npz"),
                             image_size=8, resize=False, val_size=8, **kw)
    dm.setup("fit")
    return dm


def mirrored(batch: torch.Tensor, images: torch.Tensor) -> list[bool]:
    """For each image of a batch: whether it is a mirror of one of `images` (an error if it is neither)."""
    reference = images.float().div(127.5).sub(1.0)
    out = []
    for x in batch:
        same = (reference == x).flatten(1).all(1).any()
        flipped = (reference.flip(-1) == x).flatten(1).all(1).any()
        assert same or flipped, "an augmented image is neither the original nor its mirror"
        out.append(bool(flipped))
    return out


def test_flips_mirror_some_training_images_and_never_held_out_ones(tmp_path):
    dm = make_dm(tmp_path, augment={"enabled": True})
    torch.manual_seed(0)
    flips = mirrored(next(iter(dm.train_dataloader()))[0], dm.train_set.images)
    assert any(flips) and not all(flips), flips
    torch.manual_seed(0)
    held_out = next(iter(dm.val_dataloader()))[0]
    assert torch.equal(held_out, dm.val_set.images.float().div(127.5).sub(1.0))


def test_flips_are_off_by_default(tmp_path):
    dm = make_dm(tmp_path)
    torch.manual_seed(0)
    assert not any(mirrored(next(iter(dm.train_dataloader()))[0], dm.train_set.images))


def test_random_flip_of_configs_stored_in_older_checkpoints_still_means_flips(tmp_path):
    assert DiffusionDataModule(random_flip=True).augment == {"enabled": True, "hflip_p": 0.5}
    assert DiffusionDataModule(random_flip=False).augment["enabled"] is False
    with pytest.raises(ValueError, match="data.random_flip is now data.augment"):
        DiffusionDataModule(random_flip=True, augment={"enabled": True})
    with pytest.raises(ValueError, match=r"data.augment.hflip_p=2"):
        DiffusionDataModule(augment={"enabled": True, "hflip_p": 2})


def test_natural_image_experiments_flip_and_digit_ones_do_not(make_config):
    assert make_config("model=diffusion").data.augment.enabled is False
    assert make_config("experiment=cifar10_ddpm", "data.data_dir=/nowhere").data.augment.enabled is True
    assert make_config("experiment=mnist_cond", "data.data_dir=/nowhere").data.augment.enabled is False
