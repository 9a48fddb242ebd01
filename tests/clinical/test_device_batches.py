"""data.window_device of the clinical task: on a GPU, training batches are cut where the windows live, by
the main process. Here the same path runs on the CPU (device_batch_loader), and is held to the worker
loader's batches, its epoch, its seeding and its share per DDP rank."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from datamodules.clinical import ClinicalDataModule, device_batches
from datamodules.clinical.device_batches import BatchKeys, DeviceWindowBatches
from datamodules.clinical.simulate import simulate_cohort
from datamodules.clinical.windows import collate

CPU = torch.device("cpu")
BATCH = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    simulate_cohort(num_patients=5, days=1.5, seed=2).to_csv(folder / "cohort.csv", index=False)
    return folder


def datamodule(folder, augment=None, **kw) -> ClinicalDataModule:
    torch.manual_seed(kw.pop("seed", 0))  # what seed_everything does before the datamodule is built
    dm = ClinicalDataModule(loader={"batch_size": BATCH, "num_workers": 0, **kw.pop("loader", {})},
                            data_dir=str(folder), files="cohort.csv", sequence_length=96, prediction_horizon=12,
                            min_context_length=24, train_stride=6, eval_stride=12, augment=augment, **kw)
    dm.setup("fit")
    return dm


def epoch_of(loader, epoch: int = 0) -> list[dict]:
    batches = iter(loader)  # made before set_epoch, as Lightning makes it
    loader.sampler.set_epoch(epoch)
    return list(batches)


def rows_of(loader, epoch: int = 0) -> list[torch.Tensor]:
    """The windows-table rows of each batch of `epoch`, as the loader's batches take them."""
    batches = loader.dataset
    return [batches.rank_order(e)[n * batches.batch_size:(n + 1) * batches.batch_size]
            for e, n in _keys(loader.sampler, epoch)]


def _keys(sampler: BatchKeys, epoch: int) -> list[tuple[int, int]]:
    keys = iter(sampler)
    sampler.set_epoch(epoch)
    return list(keys)


def test_every_device_batch_is_the_gather_of_its_windows(cohort):
    dm = datamodule(cohort)
    loader = dm.device_batch_loader(CPU)
    table = torch.as_tensor(dm.train_set.windows)
    batches, rows = epoch_of(loader, 1), rows_of(loader, 1)
    assert len(batches) == len(rows) > 1
    for batch, r in zip(batches, rows, strict=True):
        expected = dm.train_set.gather(table[r, 0], table[r, 1])
        assert batch.keys() == expected.keys()
        for key in expected:
            assert torch.equal(batch[key], expected[key]), key


def test_an_epoch_covers_each_window_at_most_once_in_as_many_batches_as_the_worker_loader(cohort):
    dm = datamodule(cohort)
    device_loader, worker_loader = dm.device_batch_loader(CPU), dm.train_dataloader()
    assert len(dm.train_set) % BATCH, "the fixture should leave a short last batch, to be dropped"
    assert len(device_loader) == len(worker_loader) == len(dm.train_set) // BATCH
    rows = torch.cat(rows_of(device_loader))
    assert len(epoch_of(device_loader)) == len(worker_loader)
    assert len(rows) == len(worker_loader) * BATCH and len(rows.unique()) == len(rows)
    # with loader.passes_per_epoch=2 an epoch is two permutations: each window at most twice
    dm = datamodule(cohort, loader={"passes_per_epoch": 2})
    loader = dm.device_batch_loader(CPU)
    assert len(loader) == len(dm.train_dataloader()) == 2 * len(dm.train_set) // BATCH
    assert torch.cat(rows_of(loader)).bincount().max() == 2


def test_on_the_cpu_the_device_path_gives_the_worker_loaders_batches(cohort):
    """The permutation is drawn as the worker loader's sampler draws it: on the CPU the two agree batch by batch."""
    dm = datamodule(cohort)
    for a, b in zip(epoch_of(dm.device_batch_loader(CPU), 2), epoch_of(dm.train_dataloader(), 2), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_iterating_the_device_batches_leaves_the_global_random_state_alone(cohort):
    """A resumed run iterates its loader once more than the uninterrupted one: that must not shift the RNG
    its training step draws from (dropout, noise), so the loader has a generator of its own."""
    loader = datamodule(cohort).device_batch_loader(CPU)
    state = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


def test_the_same_seed_gives_the_same_batches_and_another_seed_or_epoch_others(cohort):
    first = epoch_of(datamodule(cohort, seed=3).device_batch_loader(CPU))
    again = epoch_of(datamodule(cohort, seed=3).device_batch_loader(CPU))
    other_seed = epoch_of(datamodule(cohort, seed=4).device_batch_loader(CPU))
    next_epoch = epoch_of(datamodule(cohort, seed=3).device_batch_loader(CPU), 1)
    assert all(torch.equal(a["y"], b["y"]) and torch.equal(a["x"], b["x"]) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0]["y"], other_seed[0]["y"])
    assert not torch.equal(first[0]["y"], next_epoch[0]["y"])


def test_each_of_two_ranks_sees_its_own_half_of_the_windows(cohort):
    dm = datamodule(cohort, loader={"pin_memory": False})
    windows = dm.training_windows(dm.train_set.to(CPU))
    ranks = [DeviceWindowBatches(windows, BATCH, True, dm.seed, num_replicas=2, rank=r) for r in (0, 1)]
    orders = [r.rank_order(0) for r in ranks]
    half = -(-len(dm.train_set) // 2)
    padding = 2 * half - len(dm.train_set)  # an odd count: one window repeated, as a DistributedSampler pads
    assert len(set(orders[0].tolist()) & set(orders[1].tolist())) == padding
    assert len(torch.cat(orders).unique()) == len(dm.train_set), "the two halves cover every window"
    assert all(len(o) == half and r.num_batches == half // BATCH for o, r in zip(orders, ranks, strict=True))
    # the ranks from the Trainer, and the same share as the worker loader's sampler gives each rank
    for r, order in enumerate(orders):
        dm.trainer = type("Trainer", (), {})()  # only what data_parallel_ranks reads
        dm.trainer.strategy = type("Strategy", (), {"distributed_sampler_kwargs": {"num_replicas": 2, "rank": r}})()
        assert order.tolist() == list(dm.make_loader(dm.train_set, shuffle=True).sampler)
        assert dm.device_batch_loader(CPU).dataset.rank_order(0).tolist() == order.tolist()


def test_augmented_device_batches_differ_per_batch_and_rank_and_repeat_after_a_resume(cohort):
    dm = datamodule(cohort, augment={"enabled": True})
    loader = dm.device_batch_loader(CPU)
    whole = epoch_of(loader, 1)
    clean = [dm.train_set.gather(*torch.as_tensor(dm.train_set.windows)[r].unbind(1)) for r in rows_of(loader, 1)]
    assert not torch.equal(whole[0]["x"], clean[0]["x"]), "augment.enabled changed no training input"
    loader.sampler.resume_at(1, 1 * BATCH)  # one batch of epoch 1 done before the checkpoint
    resumed = epoch_of(loader, 1)
    assert len(resumed) == len(whole) - 1
    for a, b in zip(whole[1:], resumed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    windows = loader.dataset.windows
    rank0, rank1 = (DeviceWindowBatches(windows, BATCH, True, dm.seed, num_replicas=2, rank=r) for r in (0, 1))
    a, b = (torch.rand(4, generator=r.draws(1, 0)) for r in (rank0, rank1))
    assert not torch.equal(a, b), "two ranks drew the same augmentations"


def chunked_loader(dm, chunk_batches: int | None, drop_last: bool = True, **ranks) -> torch.utils.data.DataLoader:
    """device_batch_loader's loader, with batches cut `chunk_batches` at a time."""
    windows = dm.training_windows(dm.train_set.to(CPU))
    batches = DeviceWindowBatches(windows, BATCH, drop_last, dm.seed, chunk_batches=chunk_batches, **ranks)
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=BatchKeys(batches), collate_fn=collate)


def test_a_run_resumed_in_the_middle_of_a_chunk_trains_on_the_batches_an_uninterrupted_run_trains_on(cohort):
    """Batches are cut three at a time here; the checkpoint fell after batch 4 of epoch 1, inside the chunk of
    batches 3-5: the resumed run (new loader, nothing cached) cuts that chunk again and draws what the
    uninterrupted run drew, from batch 4 to the end of the epoch."""
    dm = datamodule(cohort, augment={"enabled": True})
    whole = epoch_of(chunked_loader(dm, 3), 1)
    resumed_loader = chunked_loader(dm, 3)
    resumed_loader.sampler.resume_at(1, 4 * BATCH)
    resumed = epoch_of(resumed_loader, 1)
    assert len(whole) % 3 and len(resumed) == len(whole) - 4, "the fixture should end the epoch in a short chunk"
    for a, b in zip(whole[4:], resumed, strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    table = torch.as_tensor(dm.train_set.windows)
    clean = dm.train_set.gather(*table[rows_of(resumed_loader, 1)[0]].unbind(1))
    assert not torch.equal(resumed[0]["x"], clean["x"]), "augment.enabled changed no training input"
    # the epoch after the resumed one is whole, and the uninterrupted run's
    assert all(torch.equal(a["y"], b["y"]) for a, b in zip(epoch_of(chunked_loader(dm, 3), 2),
                                                            epoch_of(resumed_loader, 2), strict=True))


def test_batches_cut_in_chunks_are_the_windows_of_one_batch_cut_at_a_time(cohort):
    """Any chunk size hands out the same windows in the same batches, a short last batch only without
    drop_last, and two ranks still cut their own halves."""
    dm = datamodule(cohort)
    table = torch.as_tensor(dm.train_set.windows)
    for drop_last in (True, False):
        single = epoch_of(chunked_loader(dm, 1, drop_last))
        assert len(single) == (len(dm.train_set) // BATCH if drop_last else -(-len(dm.train_set) // BATCH))
        assert len(single[-1]["y"]) == (BATCH if drop_last else len(dm.train_set) % BATCH)
        for chunk in (2, 7, None):
            loader = chunked_loader(dm, chunk, drop_last)
            for a, b, rows in zip(epoch_of(loader), single, rows_of(loader), strict=True):
                expected = dm.train_set.gather(*table[rows].unbind(1))
                for key in a:
                    assert torch.equal(a[key], b[key]) and torch.equal(a[key], expected[key]), key
    halves = []
    for rank in (0, 1):
        loader = chunked_loader(dm, 3, num_replicas=2, rank=rank)
        for batch, rows in zip(epoch_of(loader), rows_of(loader), strict=True):
            assert torch.equal(batch["x"], dm.train_set.gather(*table[rows].unbind(1))["x"])
        halves.append(set(torch.cat(rows_of(loader)).tolist()))
    assert halves[0].isdisjoint(halves[1])
    assert len(halves[0]) == len(halves[1]) == len(dm.train_set) // 2 // BATCH * BATCH  # whole batches of each half


def test_a_chunk_of_batches_stays_within_its_memory_budget(cohort, monkeypatch):
    dm = datamodule(cohort)
    batches = DeviceWindowBatches(dm.training_windows(dm.train_set), BATCH, True, dm.seed)
    assert batches.chunk_batches == batches.num_batches, "this small epoch fits in one chunk"
    batch_bytes = sum(v.nbytes for v in batches[(0, 0)].values())
    monkeypatch.setattr(device_batches, "CHUNK_BYTES", int(3.5 * batch_bytes))
    assert DeviceWindowBatches(dm.training_windows(dm.train_set), BATCH, True, dm.seed).chunk_batches == 3


class CountOps(TorchDispatchMode):
    """The aten ops run inside it, views included: on a GPU each of the others is a kernel launch of host time."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_an_augmented_batch_costs_a_fraction_of_the_kernel_launches_of_one_cut_alone(cohort):
    """Issue 27: on a GPU the step waited for each batch's few dozen launches. Cut nine at a time (as
    bench_clinical's batches come), a batch takes under a fifth of the ops it took alone."""
    dm = datamodule(cohort, augment={"enabled": True})
    per_batch = {}
    for chunk in (1, 9):
        batches = chunked_loader(dm, chunk).dataset
        batches.rank_order(0)  # drawn once an epoch on the CPU: not the per-batch cost
        with CountOps() as count:
            for number in range(18):
                batches[(0, number)]
        per_batch[chunk] = sum(count.ops.values()) / 18
    assert per_batch[1] > 60, f"one cut alone ran {per_batch[1]} ops: does this test still count them?"
    assert per_batch[9] < min(per_batch[1] / 5, 12), per_batch


def test_a_bad_window_device_is_an_error_naming_the_setting():
    for bad in ("gpu", "tpu", None):
        with pytest.raises(ValueError, match=r"data\.window_device=.*auto.*cpu.*cuda"):
            ClinicalDataModule(window_device=bad)
    assert ClinicalDataModule(window_device="cuda:1").window_device() == torch.device("cuda:1")
    assert ClinicalDataModule().window_device() == CPU, "auto without a Trainer"
