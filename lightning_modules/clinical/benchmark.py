"""Clinical forecasting's profiles for `python -m bench.quality`, and the data setting `python -m bench` gives
its rows without a Trainer."""

import torch


def outside_trainer_overrides(device: torch.device) -> list[str]:
    """For rows that run without a Trainer (the plain loop): training windows cut on the training device,
    where the suite's `window_device: auto` cuts them (there, auto reads the device from the Trainer)."""
    return [f"data.window_device={device.type}"]


QUALITY = [
    {"name": "glucobench_iglu", "overrides": [
        "experiment=glucobench_iglu", "data.files={data}/clinical/iglu_example_data/example_data_5_subject.csv"],
     "metrics": ["test_id/mse", "test_id/mae", "test_ood/mse", "test_ood/mae"], "budgets": [1]},
    {"name": "hall", "overrides": [
        "experiment=clinical_hall", "data.files={data}/clinical/iglu_example_data/example_data_hall.csv"],
     "metrics": ["test/rmse_30min", "test/mae_30min", "test/rmse_60min", "test/mae_60min"], "budgets": [2]},
]
