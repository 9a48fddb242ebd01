"""data.augment of the clinical task: training windows move, scale and get sensor noise; evaluation
windows never change; a resumed epoch draws the same augmentations in loader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.clinical import ClinicalDataModule
from datamodules.clinical.augment import AugmentedWindows
from datamodules.clinical.simulate import simulate_cohort

OFF = {"enabled": True, "offset_jitter": 0, "amplitude_scale": 0.0, "noise_std": 0.0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    simulate_cohort(num_patients=5, days=1.5, seed=2).to_csv(folder / "cohort.csv", index=False)
    return folder


def datamodule(folder, augment=None, workers=0, **kw) -> ClinicalDataModule:
    dm = ClinicalDataModule(loader={"batch_size": 8, "num_workers": workers, "persistent_workers": False},
                            data_dir=str(folder), files="cohort.csv", sequence_length=96, prediction_horizon=12,
                            min_context_length=24, train_stride=6, eval_stride=12, augment=augment, **kw)
    dm.setup("fit")
    return dm


def first_batches(loader, n=2) -> list[dict]:
    torch.manual_seed(0)
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def test_augmented_training_windows_differ_and_validation_windows_do_not(cohort):
    plain, augmented = datamodule(cohort), datamodule(cohort, augment={"enabled": True})
    train = first_batches(plain.train_dataloader()), first_batches(augmented.train_dataloader())
    assert not torch.equal(train[0][0]["x"], train[1][0]["x"]), "augment.enabled changed no training input"
    assert not torch.equal(train[0][0]["y"], train[1][0]["y"]), "augment.enabled changed no training target"
    for a, b in zip(first_batches(plain.val_dataloader()), first_batches(augmented.val_dataloader()), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), f"validation {key} changed"
    for a, b in zip(plain.test_dataloader(), augmented.test_dataloader(), strict=True):
        assert torch.equal(next(iter(a))["x"], next(iter(b))["x"])


def test_amplitude_scaling_scales_inputs_and_targets_alike_and_leaves_padding_at_zero(cohort):
    ds = datamodule(cohort).train_set
    idx = list(range(len(ds)))
    clean = ds.batch(idx)
    assert not clean["present"].all(), "the fixture should have padded windows"
    torch.manual_seed(0)
    scaled = AugmentedWindows(ds, amplitude_scale=0.2).__getitems__(idx)
    gain = scaled["y"] / clean["y"]
    assert not torch.allclose(gain, torch.ones_like(gain))
    assert torch.allclose(gain, gain[:, :1].expand_as(gain)) and ((gain - 1).abs() <= 0.2 + 1e-6).all()
    present = clean["present"]
    torch.testing.assert_close(scaled["x"][..., 0][present], (clean["x"][..., 0] * gain[:, :1])[present])
    assert (scaled["x"][~present] == 0).all(), "padding and gap filler stay zero"
    for key in ("observed", "present", "minute"):
        assert torch.equal(scaled[key], clean[key])


def test_sensor_noise_falls_on_observed_readings_only(cohort):
    ds = datamodule(cohort).train_set
    idx = list(range(len(ds)))
    clean = ds.batch(idx)
    torch.manual_seed(0)
    noisy = AugmentedWindows(ds, noise_std=3.0).__getitems__(idx)
    changed = noisy["x"][..., 0] != clean["x"][..., 0]
    observed = clean["observed"]
    assert changed[observed].float().mean() > 0.99 and not changed[~observed].any()
    assert 2.5 < (noisy["x"][..., 0] - clean["x"][..., 0])[observed].std() < 3.5
    assert torch.equal(noisy["y"], clean["y"]), "targets carry no sensor noise"


def test_offset_jitter_moves_windows_within_their_segments(cohort):
    ds = datamodule(cohort).train_set
    k, start = (torch.as_tensor(c) for c in ds.windows.T)
    augmented = AugmentedWindows(ds, offset_jitter=5)
    torch.manual_seed(0)
    moved = augmented.shift(k, start)
    assert (moved != start).float().mean() > 0.5 and ((moved - start).abs() <= 5).all()
    lengths = torch.as_tensor(np.diff(ds.offsets))[k]
    assert (moved >= ds.min_context - ds.L).all() and (moved <= lengths - ds.L - ds.H).all()
    torch.manual_seed(0)
    batch = augmented.__getitems__(list(range(len(ds))))
    assert torch.isfinite(batch["y"]).all() and batch["present"][:, -1].all()
    assert (batch["present"].sum(1) >= ds.min_context).all()
    torch.testing.assert_close(batch["y"], ds.gather(k, moved)["y"])  # the same draw, gathered


def test_unknown_or_negative_augment_settings_are_refused(cohort):
    with pytest.raises(ValueError, match="no augmentation setting 'flip'.*offset_jitter"):
        ClinicalDataModule(augment={"enabled": True, "flip": 0.5})
    with pytest.raises(ValueError, match=r"data.augment.noise_std=-1"):
        ClinicalDataModule(augment={"enabled": True, "noise_std": -1})


def test_augmented_batches_in_loader_workers_are_the_same_after_a_mid_epoch_resume(cohort):
    """Workers reseed every batch from (seed, epoch, rank, position): a loader resumed after one batch
    draws the rest of the epoch's augmentations as the uninterrupted one did."""
    dm = datamodule(cohort, augment={"enabled": True}, workers=2)

    def epoch(skip_batches: int) -> list[dict]:
        loader = dm.train_dataloader()
        loader.sampler.resume_at(1, skip_batches * 8)
        batches = iter(loader)
        loader.sampler.set_epoch(1)
        return list(batches)

    whole, resumed = epoch(0), epoch(1)
    assert len(resumed) == len(whole) - 1 > 1
    for a, b in zip(whole[1:], resumed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    first = [int(i) for i in sampler][:8]
    assert not torch.equal(whole[0]["y"], dm.train_set.batch(first)["y"]), "workers drew no augmentation"
