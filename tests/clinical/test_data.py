"""Records, resampling, gaps, windows and splits of the clinical task."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.clinical import ClinicalDataModule, RecordError, WindowDataset, load_records, to_segments
from datamodules.clinical.simulate import simulate_cohort
from tests.conftest import ROOT, SHARED_DATA

IGLU = SHARED_DATA / "clinical" / "iglu_example_data"


def write(tmp_path, text, name="r.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def series_csv(tmp_path, minutes, values, subject="a", name="r.csv", extra=""):
    t0 = pd.Timestamp("2024-03-01 00:00:00")
    rows = [f"{subject},{t0 + pd.Timedelta(minutes=m)},{v}" for m, v in zip(minutes, values, strict=True)]
    return write(tmp_path, "id,time,gl\n" + "\n".join(rows) + extra + "\n", name)


# ---- resampling and gaps --------------------------------------------------------------------
def test_resample_interpolates_short_gap_and_splits_long_one(tmp_path):
    # readings every 5 min with a 15-minute gap (2 missing points) and later a 60-minute gap
    minutes = [0, 5, 10, 25, 30, 35, 95, 100]
    values = [100, 110, 120, 150, 160, 170, 200, 210]
    path = series_csv(tmp_path, minutes, values)
    segs, stats = to_segments(load_records(path), max_gap_minutes=45)
    assert [len(s) for s in segs] == [8, 2]
    first = segs[0]
    np.testing.assert_allclose(first.values[:, 0], [100, 110, 120, 130, 140, 150, 160, 170])
    assert first.observed.tolist() == [True, True, True, False, False, True, True, True]
    assert first.valid.all()
    assert segs[1].start == pd.Timestamp("2024-03-01 01:35:00")
    assert stats["interpolated"] == 2 and stats["long_gaps"] == 1


def test_gap_exactly_max_gap_is_interpolated(tmp_path):
    # 45 minutes between readings -> 8 missing points: interpolated; 50 minutes -> split
    path = series_csv(tmp_path, [0, 45, 95], [100, 190, 100])
    segs, _ = to_segments(load_records(path), max_gap_minutes=45)
    assert [len(s) for s in segs] == [10, 1]
    np.testing.assert_allclose(segs[0].values[:, 0], np.linspace(100, 190, 10))


def test_long_gap_kept_as_masked_filler_without_split(tmp_path):
    path = series_csv(tmp_path, [0, 5, 60, 65], [100, 105, 150, 155])
    segs, _ = to_segments(load_records(path), max_gap_minutes=20, split_gaps=False)
    assert len(segs) == 1 and len(segs[0]) == 14
    assert segs[0].valid.tolist() == [True, True] + [False] * 10 + [True, True]
    assert not segs[0].observed[2:12].any()


def test_jittered_clock_lands_on_grid_and_duplicates_merge(tmp_path, caplog):
    t0 = pd.Timestamp("2024-03-01 00:00:00")
    times = [t0, t0 + pd.Timedelta(seconds=302), t0 + pd.Timedelta(seconds=598), t0 + pd.Timedelta(seconds=598)]
    text = "id,time,gl\n" + "\n".join(f"a,{t},{v}" for t, v in zip(times, [100, 110, 120, 130], strict=True))
    segs, stats = to_segments(load_records(write(tmp_path, text)))
    np.testing.assert_allclose(segs[0].values[:, 0], [100, 110, 125])
    assert stats["merged_duplicates"] == 1
    with pytest.raises(RecordError, match="duplicate timestamps"):
        to_segments(load_records(write(tmp_path, text)), on_duplicate="error")


def test_unsorted_rows_are_sorted_or_rejected(tmp_path, caplog):
    path = write(tmp_path, "id,time,gl\na,2024-01-01 00:10:00,120\na,2024-01-01 00:00:00,100\na,2024-01-01 00:05:00,110\n")
    with caplog.at_level(logging.WARNING):
        frame = load_records(path)
    assert frame["gl"].tolist() == [100, 110, 120]
    assert "row 2" in caplog.text and "go backwards" in caplog.text
    with pytest.raises(RecordError, match=r"r\.csv: column 'time', row 2: .*backwards"):
        load_records(path, on_unsorted="error")


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, match", [
    ("id,time,gl\na,2024-01-01 00:00:00,100\na,not a time,110\n", r"column 'time', row 2: cannot parse time 'not a time'"),
    ("id,time,gl\na,2024-01-01 00:00:00,100\na,2024-01-01 00:05:00,high\n", r"column 'gl', row 2: 'high' is not a finite"),
    ("id,time,gl\na,2024-01-01 00:00:00,inf\n", r"column 'gl', row 1: 'inf' is not a finite"),
    ("id,time,gl\na,2024-01-01 00:00:00,1e300\n", r"column 'gl', row 1: '1e300' is not a finite number \(within float32"),
    ("id,time,glucose\na,2024-01-01 00:00:00,100\n", r"missing column\(s\) \['gl'\]"),
    ("", "the file is empty"),
    ("id,time,gl\n", "header but no rows"),
])
def test_bad_records_name_file_column_row(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(RecordError, match=match) as err:
        load_records(path)
    assert str(path) in str(err.value)


def test_readings_outside_their_columns_range_name_file_column_row_and_setting(tmp_path):
    path = write(tmp_path, "id,time,gl\na,2024-01-01 00:00:00,100\na,2024-01-01 00:05:00,-3\na,2024-01-01 00:10:00,9000\n")
    with pytest.raises(RecordError, match=r"column 'gl', row 2: '-3' is outside \[0, 1000\] \(2 such rows\).*"
                                          r"data.value_ranges.gl") as err:
        load_records(path, value_ranges={"gl": (0, 1000)})
    assert str(path) in str(err.value)
    assert len(load_records(path)) == 3          # no range set: any finite value


def test_the_default_config_bounds_glucose(tmp_path):
    frame = simulate_cohort(num_patients=3, days=1, seed=0)
    frame.loc[frame.index[5], "gl"] = 1e300
    frame.to_csv(tmp_path / "c.csv", index=False)
    from omegaconf import OmegaConf
    value_ranges = OmegaConf.load(ROOT / "conf" / "data" / "clinical.yaml").value_ranges
    dm = ClinicalDataModule(data_dir=str(tmp_path), value_ranges=value_ranges, sequence_length=96,
                            min_context_length=None)
    with pytest.raises(RecordError, match=r"c\.csv: column 'gl', row 6"):
        dm.setup("fit")


def test_empty_target_cells_are_dropped_and_counted(tmp_path, caplog):
    path = write(tmp_path, "id,time,gl\na,2024-01-01 00:00:00,100\na,2024-01-01 00:05:00,NA\na,2024-01-01 00:10:00,\n")
    with caplog.at_level(logging.INFO):
        frame = load_records(path)
    assert len(frame) == 1 and "2 rows with an empty 'gl' dropped" in caplog.text


def test_missing_file_is_named(tmp_path):
    dm = ClinicalDataModule(data_dir=str(tmp_path), files=["nowhere.csv"])
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        dm.prepare_data()


def test_short_subjects_skipped_and_counted(tmp_path, caplog):
    frame = simulate_cohort(num_patients=4, days=2, seed=1)
    short = frame[frame["id"] == "virtual_002"].iloc[:50]
    frame = pd.concat([frame[frame["id"] != "virtual_002"], short])
    frame.to_csv(tmp_path / "c.csv", index=False)
    dm = ClinicalDataModule(data_dir=str(tmp_path), files="c.csv", sequence_length=96, min_context_length=None,
                            prediction_horizon=12, split_seed=3)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "too short for one window of 108 points, skipped: ['virtual_002']" in caplog.text


# ---- windows ------------------------------------------------------------------------------
def test_windows_pad_on_the_left_with_masks(tmp_path):
    path = series_csv(tmp_path, range(0, 100, 5), range(100, 120))
    segs, _ = to_segments(load_records(path))
    ds = WindowDataset(segs, sequence_length=16, prediction_horizon=4, stride=1, min_context=8)
    assert len(ds) == 20 - 4 - 8 + 1
    item = ds[0]
    assert item["x"].shape == (16, 1) and item["y"].shape == (4,)
    assert item["present"].tolist() == [False] * 8 + [True] * 8
    assert item["x"][:8].abs().sum() == 0
    assert item["x"][8:, 0].tolist() == list(range(100, 108))
    assert item["y"].tolist() == [108, 109, 110, 111]
    assert item["minute"][7].item() == pytest.approx(1440 - 5)  # time of day runs back into the padding


def test_targets_never_in_a_long_gap(tmp_path):
    path = series_csv(tmp_path, list(range(0, 50, 5)) + list(range(120, 170, 5)), range(20))
    segs, _ = to_segments(load_records(path), max_gap_minutes=20, split_gaps=False)
    ds = WindowDataset(segs, 4, 2, 1)
    for i in range(len(ds)):
        item = ds[i]
        assert np.isfinite(item["y"].numpy()).all()
        k, s = ds.windows[i]
        assert segs[k].valid[s + 4: s + 6].all() and segs[k].valid[s + 3]


# ---- splits -------------------------------------------------------------------------------
def _cohort(tmp_path, n=10, days=3.0):
    simulate_cohort(num_patients=n, days=days, seed=2).to_csv(tmp_path / "cohort.csv", index=False)
    return "cohort.csv"


def test_subject_split_has_no_leakage_and_scaler_is_train_only(tmp_path):
    dm = ClinicalDataModule(data_dir=str(tmp_path), files=_cohort(tmp_path), sequence_length=288,
                            min_context_length=None, prediction_horizon=12)
    dm.setup("fit")
    train, val, test = (set(dm.train_set.subjects()), set(dm.val_set.subjects()), set(dm.test_sets["test"].subjects()))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    values = np.concatenate([s.values[s.valid, 0] for s in dm.train_set.segments])
    assert dm.scaler["mean"][0] == pytest.approx(values.mean(), rel=1e-5)
    assert dm.scaler["std"][0] == pytest.approx(values.std(), rel=1e-5)


def test_glucobench_split_ood_subjects_and_segments(tmp_path):
    dm = ClinicalDataModule(data_dir=str(tmp_path), files=_cohort(tmp_path, n=10, days=4), sequence_length=192,
                            min_context_length=None, prediction_horizon=12, split="glucobench", split_seed=10,
                            segment_length=240, min_segment_length=240, eval_stride=6)
    dm.setup("fit")
    ood = set(dm.test_sets["ood"].subjects())
    subjects = sorted(f"virtual_{i:03d}" for i in range(1, 11))
    expected = set(np.random.RandomState(10).choice(subjects, 1, replace=False).tolist())
    assert ood == expected  # numpy's legacy RandomState, exactly as GlucoBench draws it
    for name in ("train", "val"):
        assert not ood & set(getattr(dm, f"{name}_set").subjects())
    assert not ood & set(dm.test_sets["id"].subjects())
    assert all(len(s) == 240 for s in dm.test_sets["id"].segments + dm.val_set.segments)
    assert len(dm.test_sets["id"]) == 7 * len(dm.test_sets["id"].segments)  # starts 0, 6, ..., 36


@pytest.mark.skipif(not IGLU.is_dir(), reason="needs ../shared/data/clinical")
def test_glucobench_protocol_on_iglu_5_subjects(tmp_path):
    dm = ClinicalDataModule(data_dir=str(tmp_path), files=str(IGLU / "example_data_5_subject.csv"),
                            sequence_length=192, min_context_length=None, split="glucobench", split_seed=10,
                            min_segment_length=240, eval_stride=6)
    dm.setup("fit")
    assert len(dm.split_subjects["ood"]) == 1 and len(dm.split_subjects["id"]) == 4
    assert len(dm.test_sets["id"]) > 0 and len(dm.test_sets["ood"]) > 0


def test_simulated_cohort_is_cached_and_in_range(tmp_path):
    dm = ClinicalDataModule(cache_dir=str(tmp_path), simulate={"num_patients": 3, "days": 1})
    dm.prepare_data()
    path = dm.simulated_path()
    stamp = path.stat().st_mtime_ns
    ClinicalDataModule(cache_dir=str(tmp_path), simulate={"num_patients": 3, "days": 1}).prepare_data()
    assert path.stat().st_mtime_ns == stamp
    frame = pd.read_csv(path)
    assert list(frame.columns[:3]) == ["id", "time", "gl"]
    assert frame["gl"].between(40, 400).all() and frame["id"].nunique() == 3


def test_batched_fetch_matches_single_items(tmp_path):
    frame = simulate_cohort(num_patients=2, days=1.5, seed=4)
    frame.to_csv(tmp_path / "c.csv", index=False)
    from datamodules.clinical.records import read_segments
    from datamodules.clinical.windows import Batched, collate
    segs, _ = read_segments([tmp_path / "c.csv"])
    ds = WindowDataset(segs, sequence_length=144, prediction_horizon=12, stride=7, min_context=40)
    idx = [0, 1, len(ds) // 2, len(ds) - 1]
    batched = collate(Batched(ds).__getitems__(idx))
    single = collate([ds[i] for i in idx])
    assert batched.keys() == single.keys()
    for key in batched:
        torch.testing.assert_close(batched[key], single[key], msg=key)
    loader = torch.utils.data.DataLoader(Batched(ds), batch_size=5, collate_fn=collate)
    assert next(iter(loader))["x"].shape == (5, 144, 1)
    assert next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))["x"].shape == (5, 144, 1)  # plain loader too
