"""The shared base classes: parameter groups, batch-size splitting, device and precision resolution."""
from __future__ import annotations

import functools

import pytest
import torch

from datamodules.base import BaseDataModule
from suite import hardware
from tests.tiny_task import TinyModule


def test_no_weight_decay_on_biases_and_norm_weights():
    model = TinyModule(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1))
    optimizer = model.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {"net.0.bias", "net.1.weight", "net.1.bias", "net.4.bias"}
    assert {names[id(p)] for p in decay["params"]} == {"net.0.weight", "net.4.weight"}


def test_missing_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="has no optimizer"):
        TinyModule().configure_optimizers()


class _FakeTrainer:
    def __init__(self, world_size):
        self.world_size = world_size


@pytest.mark.parametrize("world,expected", [(1, 32), (2, 16), (4, 8)])
def test_global_batch_splits_across_devices(world, expected):
    dm = BaseDataModule({"batch_size": 32, "batch_size_is_global": True})
    dm.trainer = _FakeTrainer(world)
    assert dm.per_device_batch_size == expected


def test_per_device_batch_is_not_split():
    dm = BaseDataModule({"batch_size": 32})
    dm.trainer = _FakeTrainer(4)
    assert dm.per_device_batch_size == 32


def test_global_batch_that_does_not_divide_is_a_clear_error():
    dm = BaseDataModule({"batch_size": 30, "batch_size_is_global": True})
    dm.trainer = _FakeTrainer(4)
    with pytest.raises(ValueError, match="batch_size=30 .* 4 devices"):
        _ = dm.per_device_batch_size


def test_unknown_loader_setting_is_named():
    with pytest.raises(ValueError, match="batch_sise"):
        BaseDataModule({"batch_sise": 3})


def test_device_falls_back_to_cpu_with_a_notice(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert hardware.resolve_accelerator("cuda") == "cpu"
        assert hardware.resolve_accelerator("auto") == "cpu"
    assert "No CUDA GPU found" in caplog.text
    assert hardware.resolve_precision("auto", "cpu") == "32-true"
    assert hardware.resolve_precision("16-mixed", "cpu") == "32-true"


def test_precision_auto_on_gpu_prefers_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert hardware.resolve_precision("auto", "gpu") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert hardware.resolve_precision("auto", "gpu") == "16-mixed"


def test_bad_device_names_the_choices():
    with pytest.raises(ValueError, match="device='quantum'.*auto, cuda"):
        hardware.resolve_accelerator("quantum")


def test_passes_per_epoch_walks_the_data_that_many_times_each_in_its_own_order():
    from torch.utils.data import TensorDataset

    dm = BaseDataModule({"batch_size": 5, "passes_per_epoch": 3})
    loader = dm.make_loader(TensorDataset(torch.arange(10)), shuffle=True)
    seen = torch.cat([b[0] for b in loader]).tolist()
    assert len(loader) == 6 and len(seen) == 30
    passes = [seen[i:i + 10] for i in range(0, 30, 10)]
    assert all(sorted(p) == list(range(10)) for p in passes)  # every sample once per pass
    assert len({tuple(p) for p in passes}) == 3  # a fresh order each pass
    # a run resumed after 2 batches of the epoch sees the remaining 20 samples, as the uninterrupted one did
    loader.sampler.resume_at(0, 10)
    assert torch.cat([b[0] for b in loader]).tolist() == seen[10:]


def test_passes_per_epoch_with_a_task_sampler_is_a_clear_error():
    from torch.utils.data import SequentialSampler, TensorDataset

    dataset = TensorDataset(torch.arange(10))
    dm = BaseDataModule({"passes_per_epoch": 2})
    with pytest.raises(ValueError, match="loader.passes_per_epoch=2.*SequentialSampler"):
        dm.make_loader(dataset, shuffle=True, sampler=SequentialSampler(dataset))
    with pytest.raises(ValueError, match="loader.passes_per_epoch must be >= 1, got 0"):
        BaseDataModule({"passes_per_epoch": 0})


def test_training_sampler_deals_ranks_their_share_and_resumes_each_mid_epoch():
    """Each rank gets what Lightning's DistributedSamplerWrapper would give (so DDP orders are unchanged),
    and a mid-epoch resume skips each rank's used samples instead of crashing on a short epoch."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from datamodules.base import ResumableSampler

    for rank in (0, 1):
        sampler = ResumableSampler(11, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(4)
        mine = list(sampler)
        reference = ResumableSampler(11, seed=3)
        reference.set_epoch(4)
        wrapped = DistributedSamplerWrapper(reference, num_replicas=2, rank=rank, shuffle=False)
        wrapped.set_epoch(4)
        assert mine == list(wrapped) and len(mine) == len(sampler) == 6
        sampler.resume_at(4, 2 * 2 * 2)  # 2 batches of 2 per rank done, 8 samples over both ranks
        assert list(sampler) == mine[4:]
