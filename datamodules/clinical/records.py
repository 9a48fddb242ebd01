"""Reading patient records in long format and turning them into regular, gap-aware segments.

A record file is CSV or Parquet with one row per reading: a subject id column, a timestamp
column, the forecast target column and optional covariate columns (the iglu / GlucoBench layout
`id, time, gl` works as is). `load_records` validates it and says which file, column and row is
wrong; `to_segments` resamples each subject onto a fixed grid, interpolates short gaps, splits at
long ones and keeps a mask of the readings that were really observed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".parquet", ".pq", ".csv.gz")


class RecordError(ValueError):
    """A record file that cannot be used, with the file, column and row that is wrong."""


@dataclass
class Segment:
    """One gap-free stretch of a subject's series on the regular grid."""

    subject: str
    start: pd.Timestamp          # time of the first grid point
    interval: pd.Timedelta
    values: np.ndarray           # [T, C] float32: target first, then covariates
    observed: np.ndarray         # [T] bool: a real reading landed on this grid point
    valid: np.ndarray = field(default=None)  # [T] bool: value usable (observed or interpolated)

    def __post_init__(self):
        if self.valid is None:
            self.valid = np.ones(len(self.values), dtype=bool)

    def __len__(self) -> int:
        return len(self.values)

    def times(self) -> pd.DatetimeIndex:
        return pd.date_range(self.start, periods=len(self), freq=self.interval)

    def minute_of_day(self) -> np.ndarray:
        t = self.times()
        return (t.hour * 60 + t.minute + t.second / 60).to_numpy(dtype=np.float32)


def find_files(paths: str | Path | Sequence[str | Path], base: Path | None = None) -> list[Path]:
    """Expand files and folders (every CSV/Parquet inside) into a sorted file list."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_absolute() and base is not None and not path.exists():
            path = base / path
        if path.is_dir():
            inside = sorted(f for f in path.rglob("*") if f.is_file() and str(f).lower().endswith(SUFFIXES))
            if not inside:
                raise FileNotFoundError(f"{path} holds no CSV or Parquet files")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"Patient record file or folder {path} does not exist")
    return found


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    parquet = name.endswith((".parquet", ".pq"))
    if path.stat().st_size == 0:
        raise RecordError(f"{path}: the file is empty")
    try:
        if parquet:
            frame = pd.read_parquet(path)
        else:
            with open(path, errors="replace") if not name.endswith(".gz") else __import__("gzip").open(path, "rt") as f:
                header = f.readline()
            if not header.strip():
                raise RecordError(f"{path}: the file is empty (no header line)")
            sep = max([",", ";", "\t"], key=header.count)
            frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except RecordError:
        raise
    except Exception as err:  # noqa: BLE001  (any reader failure becomes one clear message)
        raise RecordError(f"{path}: cannot read it as {'Parquet' if parquet else 'CSV'}: {err}") from None
    if frame.empty:
        raise RecordError(f"{path}: the file has a header but no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def load_records(
    path: Path,
    id_column: str = "id",
    time_column: str = "time",
    target_column: str = "gl",
    covariate_columns: Sequence[str] = (),
    time_format: str | None = None,
    on_unsorted: str = "sort",
    value_ranges: Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """One file as a table with columns id (str), time (datetime), target and covariates (float).

    Rows whose target is empty (NA, NaN, '') are dropped and counted; anything else that is not
    a finite number (in float32, as the model reads it), outside its column's `value_ranges`, a time
    that does not parse, or a missing column is an error naming the file, column and (1-based data) row. Timestamps that go backwards within a subject are sorted with a
    warning (on_unsorted=sort) or rejected (on_unsorted=error).
    """
    frame = _read_table(path)
    wanted = [id_column, time_column, target_column, *covariate_columns]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise RecordError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)}. "
                          "Set data.id_column / data.time_column / data.target_column / data.covariate_columns.")
    out = pd.DataFrame({"id": frame[id_column].astype(str).str.strip()})
    if (out["id"] == "").any() or frame[id_column].isna().any():
        row = int(np.flatnonzero((out["id"] == "").to_numpy() | frame[id_column].isna().to_numpy())[0])
        raise RecordError(f"{path}: column '{id_column}', row {row + 1}: empty subject id")

    raw_time = frame[time_column]
    times = pd.to_datetime(raw_time, format=time_format, errors="coerce")
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    if times.isna().any():
        row = int(np.flatnonzero(times.isna().to_numpy())[0])
        raise RecordError(f"{path}: column '{time_column}', row {row + 1}: cannot parse time {raw_time.iloc[row]!r}"
                          + (f" with format {time_format!r}" if time_format else ""))
    out["time"] = times.to_numpy()

    for col in [target_column, *covariate_columns]:
        raw = frame[col]
        text = raw.astype(str).str.strip() if raw.dtype == object or str(raw.dtype).startswith("str") else None
        empty = np.zeros(len(raw), dtype=bool)
        if text is not None:
            empty = text.str.upper().isin(["", "NA", "NAN", "NULL", "NONE"]).to_numpy()
            values = pd.to_numeric(text.where(~empty, None), errors="coerce").to_numpy(dtype=float)
        else:
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
            empty = np.isnan(values) & raw.isna().to_numpy()
        with np.errstate(over="ignore"):
            bad = ~empty & ~np.isfinite(values.astype(np.float32))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise RecordError(f"{path}: column '{col}', row {row + 1}: {raw.iloc[row]!r} is not a finite number "
                              "(within float32's range)")
        lo, hi = (value_ranges or {}).get(col, (-np.inf, np.inf))
        outside = ~empty & ((values < lo) | (values > hi))
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise RecordError(f"{path}: column '{col}', row {row + 1}: {raw.iloc[row]!r} is outside [{lo:g}, {hi:g}] "
                              f"({int(outside.sum())} such rows); fix the file or widen data.value_ranges.{col}")
        if col != target_column:
            values = np.where(empty, 0.0, values)  # a covariate left empty means nothing happened
        out[col] = values
    empty_target = np.isnan(out[target_column].to_numpy())
    if empty_target.any():
        log.info("%s: %d rows with an empty '%s' dropped", path, int(empty_target.sum()), target_column)
        out = out[~empty_target]
    if out.empty:
        raise RecordError(f"{path}: column '{target_column}' has no values")

    for subject, t in out.groupby("id", sort=False)["time"]:
        backwards = np.flatnonzero(np.diff(t.to_numpy()) < np.timedelta64(0))
        if backwards.size:
            row = int(t.index[backwards[0] + 1])
            msg = (f"{path}: column '{time_column}', row {row + 1}: timestamps of subject {subject!r} go "
                   f"backwards ({t.iloc[backwards[0]]} then {t.iloc[backwards[0] + 1]}); {backwards.size} such rows")
            if on_unsorted == "error":
                raise RecordError(msg + ". Sort the file or set data.on_unsorted=sort.")
            log.warning("%s; sorting them.", msg)
    out = out.sort_values(["id", "time"], kind="stable").reset_index(drop=True)
    out.attrs["source"] = str(path)
    return out


def to_segments(
    records: pd.DataFrame,
    target_column: str = "gl",
    covariate_columns: Sequence[str] = (),
    interval_minutes: float = 5.0,
    max_gap_minutes: float = 45.0,
    split_gaps: bool = True,
    min_segment_length: int = 1,
    on_duplicate: str = "mean",
    source: str | None = None,
) -> tuple[list[Segment], dict]:
    """Resample every subject onto a regular grid and cut it into gap-aware segments.

    - The grid starts at a subject's first reading and steps by `interval_minutes`; each reading
      goes to its nearest grid point. Several readings on one grid point (duplicate timestamps,
      or a clock that drifts) are averaged (`on_duplicate=mean`) or rejected (`error`).
    - A gap is a run of grid points without a reading. If the time between the readings on both
      sides is at most `max_gap_minutes` it is linearly interpolated; otherwise the series is split
      there (`split_gaps=true`) or, with `split_gaps=false`, the gap stays in the segment with
      valid=false (the value carried forward only as filler, never used as a target).
    - `observed` marks grid points that got a real reading; interpolated points have
      observed=false, so a model can tell invented values from measured ones.
    - Segments shorter than `min_segment_length` grid points are dropped and counted.
    """
    source = source or records.attrs.get("source", "records")
    step = pd.Timedelta(minutes=interval_minutes)
    step_ns = step.value
    max_missing = int(np.floor(max_gap_minutes / interval_minutes + 1e-9)) - 1  # grid points a gap may lack
    columns = [target_column, *covariate_columns]
    stats = {"subjects": 0, "segments": 0, "dropped_segments": 0, "merged_duplicates": 0,
             "interpolated": 0, "long_gaps": 0}
    segments: list[Segment] = []
    for subject, rows in records.groupby("id", sort=True):
        stats["subjects"] += 1
        t = pd.DatetimeIndex(rows["time"]).as_unit("ns").asi8
        start_ns = t[0]
        slot = np.rint((t - start_ns) / step_ns).astype(np.int64)
        uniq, inverse, counts = np.unique(slot, return_inverse=True, return_counts=True)
        if (counts > 1).any():
            if on_duplicate == "error":
                first = int(np.flatnonzero(counts[inverse] > 1)[0])
                raise RecordError(f"{source}: subject {subject!r}, time {rows['time'].iloc[first]}: "
                                  f"{int(counts.max())} readings fall on one {interval_minutes:g}-minute grid point "
                                  "(duplicate timestamps). Set data.on_duplicate=mean to average them.")
            stats["merged_duplicates"] += int((counts - 1).sum())
        vals = rows[columns].to_numpy(dtype=np.float64)
        summed = np.zeros((uniq.size, len(columns)))
        np.add.at(summed, inverse, vals)
        merged = summed / counts[:, None]
        # covariates are events (carbs, insulin): sum them instead of averaging
        if len(columns) > 1:
            merged[:, 1:] = summed[:, 1:]

        # split where a gap is too long to interpolate
        gaps = np.diff(uniq) - 1  # missing grid points between consecutive readings
        long_gap = gaps > max_missing
        stats["long_gaps"] += int(long_gap.sum())
        if split_gaps:
            cuts = np.flatnonzero(long_gap) + 1
            pieces = np.split(np.arange(uniq.size), cuts)
        else:
            pieces = [np.arange(uniq.size)]
        for piece in pieces:
            s = uniq[piece]
            length = int(s[-1] - s[0] + 1)
            if length < min_segment_length:
                stats["dropped_segments"] += 1
                continue
            pos = s - s[0]
            grid = np.full((length, len(columns)), np.nan)
            grid[pos] = merged[piece]
            observed = np.zeros(length, dtype=bool)
            observed[pos] = True
            valid = np.ones(length, dtype=bool)
            # linear interpolation of the target (and covariates: zero where nothing was reported)
            target = grid[:, 0]
            filled = np.interp(np.arange(length), pos, target[pos])
            if not split_gaps:
                g = np.diff(pos) - 1
                for k in np.flatnonzero(g > max_missing):
                    a, b = pos[k], pos[k + 1]
                    valid[a + 1:b] = False
                    filled[a + 1:b] = target[a]  # carried forward as filler only
            stats["interpolated"] += int((~observed & valid).sum())
            grid[:, 0] = filled
            if len(columns) > 1:
                grid[:, 1:] = np.nan_to_num(grid[:, 1:], nan=0.0)
            segments.append(Segment(str(subject), pd.Timestamp(start_ns + int(s[0]) * step_ns), step,
                                    grid.astype(np.float32), observed, valid))
            stats["segments"] += 1
    return segments, stats


def read_segments(files: Iterable[Path], *, id_column="id", time_column="time", target_column="gl",
                  covariate_columns: Sequence[str] = (), time_format=None, on_unsorted="sort", value_ranges=None,
                  **segment_kwargs) -> tuple[list[Segment], dict]:
    """`load_records` + `to_segments` over several files, with the counts summed and logged."""
    all_segments: list[Segment] = []
    total: dict = {}
    seen: dict[str, Path] = {}
    for path in files:
        records = load_records(path, id_column, time_column, target_column, covariate_columns, time_format, on_unsorted,
                               value_ranges)
        for subject in records["id"].unique():
            if subject in seen:
                raise RecordError(f"{path}: subject {subject!r} also appears in {seen[subject]}; "
                                  "subject ids must be unique across files")
            seen[subject] = path
        segments, stats = to_segments(records, target_column, covariate_columns, source=str(path), **segment_kwargs)
        all_segments.extend(segments)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
        if stats["merged_duplicates"]:
            log.warning("%s: %d readings shared a grid point with another (duplicate timestamps) and were averaged",
                        path, stats["merged_duplicates"])
    log.info("Records: %s", ", ".join(f"{k}={v}" for k, v in total.items()))
    return all_segments, total
