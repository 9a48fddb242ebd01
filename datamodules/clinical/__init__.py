from datamodules.clinical.datamodule import ClinicalDataModule
from datamodules.clinical.records import RecordError, Segment, load_records, to_segments
from datamodules.clinical.simulate import simulate_cohort
from datamodules.clinical.windows import WindowDataset

__all__ = ["ClinicalDataModule", "RecordError", "Segment", "WindowDataset", "load_records", "simulate_cohort",
           "to_segments"]
