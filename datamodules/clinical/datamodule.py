"""Patient time series for forecasting: records -> segments -> windows, split by subject."""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.task_data import TaskData
from datamodules.augment import augment_settings, non_negative
from datamodules.base import BaseDataModule
from datamodules.builtin import builtin_folder, user_folder
from datamodules.clinical.augment import DEFAULTS as AUGMENT_DEFAULTS
from datamodules.clinical.augment import AugmentedWindows
from datamodules.clinical.device_batches import BatchKeys, DeviceWindowBatches
from datamodules.clinical.records import RecordError, Segment, find_files, read_segments
from datamodules.clinical.windows import Batched, WindowDataset, collate

log = logging.getLogger(__name__)

SPLITS = ("subject", "glucobench")
WINDOW_DEVICES = ("auto", "cpu", "cuda")


class ClinicalDataModule(BaseDataModule):
    """Forecasting windows over patients' records, split so that no subject is in two splits.

    Data: `files` (CSV/Parquet files or folders, long format; relative ones are looked up under
    `data_dir`), or every such file in `data_dir`; all only read. With neither, a simulated cohort
    (Bergman minimal model, see simulate.py) is generated into the suite's `cache_dir` on first use.

    Splits:
      subject     subjects shuffled with `split_seed`, then `val_fraction` / `test_fraction` of
                  them held out (at least one each); one test set named "test".
      glucobench  GlucoBench's protocol (Sergazinov et al. 2024): ceil(`ood_fraction` * subjects)
                  chosen with numpy's legacy RandomState(`split_seed`) form the OOD test set;
                  of every other subject's segment the last `segment_length` points are the ID
                  test, the `segment_length` before them validation, the rest training (shorter
                  segments give up test, then validation). Test sets "id" and "ood". Here ID
                  and OOD subjects are disjoint but ID train/val/test share subjects, by design.

    `augment` (off by default): training windows get random offsets, amplitude and sensor noise
    (clinical/augment.py); validation, test and predict windows never do.

    `window_device` (auto: the Trainer's device): on CUDA the training set moves there once and every
    training batch is cut there without loader workers (clinical/device_batches.py); on the CPU, loader
    workers cut them. Validation, test and predict windows are always cut by the loader on the CPU.
    """

    def __init__(
        self,
        loader: Mapping[str, Any] | None = None,
        data_dir: str | None = None,
        cache_dir: str = "data/clinical",
        files: str | Sequence[str] | None = None,
        files_required: str | None = None,
        simulate: Mapping[str, Any] | None = None,
        id_column: str = "id",
        time_column: str = "time",
        target_column: str = "gl",
        covariate_columns: Sequence[str] = (),
        time_format: str | None = None,
        interval_minutes: float = 5.0,
        max_gap_minutes: float = 45.0,
        split_gaps: bool = True,
        min_segment_length: int | None = None,
        on_unsorted: str = "sort",
        on_duplicate: str = "mean",
        value_ranges: Mapping[str, Sequence[float]] | None = None,
        sequence_length: int = 1440,
        prediction_horizon: int = 12,
        min_context_length: int | None = None,
        train_stride: int = 1,
        eval_stride: int = 12,
        split: str = "subject",
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        ood_fraction: float = 0.1,
        segment_length: int = 240,
        predict_files: str | Sequence[str] | None = None,
        predict_stride: int | None = None,
        augment: Mapping[str, Any] | None = None,
        window_device: str = "auto",
    ) -> None:
        super().__init__(loader)
        try:
            device_type = "auto" if window_device == "auto" else torch.device(window_device).type
        except (RuntimeError, TypeError, ValueError):
            device_type = None
        if device_type not in WINDOW_DEVICES:
            raise ValueError(f"data.window_device={window_device!r}; choose auto (the Trainer's device), cpu or "
                             "cuda (or cuda:<index>)")
        self.window_device_setting = str(window_device)
        self._train_set_on: tuple[torch.device, WindowDataset] | None = None  # moved once, reused by every loader
        self.augment = augment_settings(augment, AUGMENT_DEFAULTS, "clinical")
        non_negative(self.augment, *AUGMENT_DEFAULTS)
        if self.augment["offset_jitter"] != int(self.augment["offset_jitter"]):
            raise ValueError(f"data.augment.offset_jitter={self.augment['offset_jitter']}: expected a whole number of steps")
        if split not in SPLITS:
            raise ValueError(f"data.split={split!r}; choose one of {SPLITS}")
        if on_unsorted not in ("sort", "error"):
            raise ValueError(f"data.on_unsorted={on_unsorted!r}; choose sort or error")
        if on_duplicate not in ("mean", "error"):
            raise ValueError(f"data.on_duplicate={on_duplicate!r}; choose mean or error")
        self.data_dir = Path(str(data_dir)).expanduser() if data_dir is not None else None
        self.cache_dir = cache_dir
        if files is None and data_dir is None and files_required:
            raise ValueError(f"This configuration needs real data: pass data.files=<{files_required}> "
                             "(or data.data_dir=<a folder of them>)")
        self.files = files
        self.simulate = dict(simulate or {})
        self.read_kwargs = {
            "id_column": id_column, "time_column": time_column, "target_column": target_column,
            "covariate_columns": list(covariate_columns or ()), "time_format": time_format,
            "on_unsorted": on_unsorted, "interval_minutes": float(interval_minutes),
            "max_gap_minutes": float(max_gap_minutes), "split_gaps": bool(split_gaps),
            "min_segment_length": int(min_segment_length or 1), "on_duplicate": on_duplicate,
            "value_ranges": {str(k): (float(v[0]), float(v[1])) for k, v in (value_ranges or {}).items()},
        }
        self.interval_minutes = float(interval_minutes)
        self.target_column = target_column
        self.covariate_columns = list(covariate_columns or ())
        self.sequence_length = int(sequence_length)
        self.prediction_horizon = int(prediction_horizon)
        self.min_context_length = min_context_length
        self.train_stride, self.eval_stride = int(train_stride), int(eval_stride)
        self.split, self.split_seed = split, int(split_seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.ood_fraction, self.segment_length = float(ood_fraction), int(segment_length)
        self.predict_files = predict_files
        self.predict_stride = int(predict_stride or prediction_horizon)
        self.train_set = self.val_set = self.predict_set = None
        self.test_sets: dict[str, WindowDataset] = {}
        self.scaler: dict[str, list[float]] | None = None
        self.split_subjects: dict[str, list[str]] = {}

    @property
    def input_channels(self) -> int:
        return 1 + len(self.covariate_columns)

    # ---- data on disk ------------------------------------------------------------------------
    def simulated_path(self) -> Path:
        """The simulated cohort's file, generated into cache_dir on first use."""
        params = {"num_patients": 12, "days": 7.0, "seed": 0, **self.simulate}

        def write(folder: Path) -> None:
            from datamodules.clinical.simulate import simulate_cohort

            log.info("Simulating a virtual cohort (%s)", params)
            simulate_cohort(**params).to_csv(folder / "cohort.csv", index=False, date_format="%Y-%m-%d %H:%M:%S")

        return builtin_folder(self.cache_dir, "cohort", params, write) / "cohort.csv"

    def prepare_data(self) -> None:
        self.record_files()  # generate the cohort, or fail early naming a missing path

    def record_files(self) -> list[Path]:
        if self.data_dir is not None:
            user_folder(self.data_dir, "patient records (CSV/Parquet files)")
        if self.files is not None:
            return find_files(self.files, base=self.data_dir)
        if self.data_dir is not None:
            return find_files(self.data_dir)
        return [self.simulated_path()]

    def read(self, files: Sequence[Path]) -> list[Segment]:
        segments, _ = read_segments(files, **self.read_kwargs)
        if not segments:
            raise RecordError(f"No usable segments in {[str(f) for f in files]} (all shorter than "
                              f"data.min_segment_length={self.read_kwargs['min_segment_length']})")
        return segments

    # ---- splits ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.train_set is not None:
            return
        segments = self.read(self.record_files())
        if self.split == "subject":
            parts = self._split_by_subject(segments)
        else:
            parts = self._split_glucobench(segments)
        L, H, ctx = self.sequence_length, self.prediction_horizon, self.min_context_length
        make = lambda segs, stride: WindowDataset(segs, L, H, stride, ctx)
        self.train_set = make(parts["train"], self.train_stride)
        self.val_set = make(parts["val"], self.eval_stride)
        self.test_sets = {name: make(segs, self.eval_stride) for name, segs in parts.items()
                          if name not in ("train", "val")}
        self._report_skipped(parts)
        for name, ds in [("train", self.train_set), ("val", self.val_set), *self.test_sets.items()]:
            log.info("%s: %d subjects, %d segments, %d windows", name, len(ds.subjects()), len(ds.segments), len(ds))
        if len(self.train_set) == 0:
            raise RecordError(f"No training windows: every training segment is shorter than sequence_length + "
                              f"prediction_horizon = {L + H} grid points. Lower data.sequence_length or set "
                              "data.min_context_length to allow padded windows.")
        if len(self.val_set) == 0:
            raise RecordError(f"No validation windows of {L + H} points in subjects {self.split_subjects.get('val')}; "
                              "lower data.sequence_length or set data.min_context_length.")
        self.scaler = self._fit_scaler(parts["train"])

    def _report_skipped(self, parts: dict[str, list[Segment]]) -> None:
        need = (self.min_context_length or self.sequence_length) + self.prediction_horizon
        for name, segs in parts.items():
            subjects = {s.subject for s in segs}
            usable = {s.subject for s in segs if len(s) >= need}
            if subjects - usable:
                log.warning("%s: %d subject(s) too short for one window of %d points, skipped: %s",
                            name, len(subjects - usable), need, sorted(subjects - usable))

    def _split_by_subject(self, segments: list[Segment]) -> dict[str, list[Segment]]:
        subjects = sorted({s.subject for s in segments})
        if len(subjects) < 3:
            raise RecordError(f"split=subject needs at least 3 subjects (train, val, test); the data has "
                              f"{len(subjects)}: {subjects}. Use data.split=glucobench to split within subjects.")
        order = [str(s) for s in np.random.default_rng(self.split_seed).permutation(subjects)]
        n_test = max(1, round(self.test_fraction * len(subjects)))
        n_val = max(1, round(self.val_fraction * len(subjects)))
        if n_test + n_val >= len(subjects):
            n_test, n_val = 1, 1
        groups = {"test": set(order[:n_test]), "val": set(order[n_test:n_test + n_val]),
                  "train": set(order[n_test + n_val:])}
        self.split_subjects = {k: sorted(v) for k, v in groups.items()}
        return {k: [s for s in segments if s.subject in groups[k]] for k in ("train", "val", "test")}

    def _split_glucobench(self, segments: list[Segment]) -> dict[str, list[Segment]]:
        subjects = sorted({s.subject for s in segments})
        k = math.ceil(len(subjects) * self.ood_fraction)
        if k >= len(subjects):
            raise RecordError(f"split=glucobench: ood_fraction={self.ood_fraction} leaves no ID subject of {subjects}")
        ood = {str(s) for s in np.random.RandomState(self.split_seed).choice(subjects, k, replace=False)}
        n = self.segment_length
        parts: dict[str, list[Segment]] = {"train": [], "val": [], "id": [], "ood": []}
        for seg in segments:
            if seg.subject in ood:
                parts["ood"].append(seg)
                continue
            T = len(seg)
            if T >= 3 * n:
                cuts = [("train", 0, T - 2 * n), ("val", T - 2 * n, T - n), ("id", T - n, T)]
            elif T >= 2 * n:
                cuts = [("train", 0, T - n), ("val", T - n, T)]
            elif T >= n:
                cuts = [("train", 0, T)]
            else:
                cuts = []
            for name, a, b in cuts:
                parts[name].append(_slice(seg, a, b))
        self.split_subjects = {"ood": sorted(ood), "id": sorted(set(subjects) - ood)}
        return parts

    def _fit_scaler(self, segments: list[Segment]) -> dict[str, list[float]]:
        values = np.concatenate([s.values[s.valid] for s in segments])
        mean = values.mean(0)
        std = values.std(0)
        std = np.where(std > 1e-6, std, 1.0)
        return {"mean": mean.astype(float).tolist(), "std": std.astype(float).tolist()}

    # ---- prediction --------------------------------------------------------------------------
    def _setup_predict(self) -> None:
        if self.predict_files is not None:
            segments = self.read(find_files(self.predict_files, base=self.data_dir))
        else:
            if self.train_set is None:
                self.setup("fit")
            segments = [s for ds in self.test_sets.values() for s in ds.segments]
        self.predict_set = WindowDataset(segments, self.sequence_length, self.prediction_horizon,
                                         self.predict_stride, self.min_context_length,
                                         allow_open_end=True, with_meta=True)
        if len(self.predict_set) == 0:
            raise RecordError(f"No series in the prediction data is long enough for "
                              f"{self.min_context_length or self.sequence_length} input points")
        log.info("predict: %d subjects, %d windows", len(self.predict_set.subjects()), len(self.predict_set))

    # ---- loaders ---------------------------------------------------------------------------
    def window_device(self) -> torch.device:
        """Where training batches are cut: `data.window_device`, auto being the Trainer's device (the CPU
        without a Trainer)."""
        if self.window_device_setting == "auto":
            trainer = getattr(self, "trainer", None)
            return trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return torch.device(self.window_device_setting)

    def training_windows(self, dataset: WindowDataset) -> Batched:
        """The training windows of `dataset` as the loader cuts them: augmented with data.augment.enabled."""
        if not self.augment["enabled"]:
            return Batched(dataset)
        return AugmentedWindows(dataset, **{key: value for key, value in self.augment.items() if key != "enabled"})

    def train_dataloader(self):
        device = self.window_device()
        if device.type == "cuda":
            return self.device_batch_loader(device)
        return self.make_loader(self.training_windows(self.train_set), shuffle=True, collate_fn=collate,
                                drop_last=self.drops_short_batch)

    @property
    def drops_short_batch(self) -> bool:
        """A short last training batch is dropped, unless it is the only one."""
        return len(self.train_set) > self.per_device_batch_size

    def device_batch_loader(self, device: torch.device) -> DataLoader:
        """Training batches cut on `device` from the training set moved there, by the main process (worker
        processes cannot touch CUDA tensors): train_dataloader's loader on a GPU, and on the CPU in tests."""
        if self._train_set_on is None or self._train_set_on[0] != device:
            self._train_set_on = (device, self.train_set.to(device))
        batches = DeviceWindowBatches(self.training_windows(self._train_set_on[1]), self.per_device_batch_size,
                                      self.drops_short_batch, self.seed, self.passes_per_epoch,
                                      **self.data_parallel_ranks())
        sampler = BatchKeys(batches)
        self.resume_sampler(sampler)
        # its own generator, as make_loader's: iterating must not draw from the global RNG (a resume would shift it)
        return DataLoader(batches, batch_size=None, sampler=sampler, collate_fn=collate, num_workers=0,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        return self.make_loader(Batched(self.val_set), collate_fn=collate)

    def test_dataloader(self):
        return [self.make_loader(Batched(ds), collate_fn=collate) for ds in self.test_sets.values()]

    def predict_dataloader(self):
        return self.make_loader(self.predict_set)

    @property
    def test_set_names(self) -> list[str]:
        return list(self.test_sets)

    def task_data(self) -> TaskData:
        """The module scales with `scaler`, fits its ridge baseline on `train_set` and names its test
        metrics by `test_set_names`; callbacks.forecast_plots draws from `val_set`."""
        return TaskData(train_set=self.train_set, val_set=self.val_set, test_set_names=self.test_set_names,
                        scaler=self.scaler)


def _slice(seg: Segment, a: int, b: int) -> Segment:
    return Segment(seg.subject, seg.start + seg.interval * a, seg.interval, seg.values[a:b],
                   seg.observed[a:b], seg.valid[a:b])
