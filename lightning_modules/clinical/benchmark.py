"""Clinical forecasting's profiles for `python -m bench.quality`."""

QUALITY = [
    {"name": "glucobench_iglu", "overrides": [
        "experiment=glucobench_iglu", "data.files={data}/clinical/iglu_example_data/example_data_5_subject.csv"],
     "metrics": ["test_id/mse", "test_id/mae", "test_ood/mse", "test_ood/mae"], "budgets": [1]},
    {"name": "hall", "overrides": [
        "experiment=clinical_hall", "data.files={data}/clinical/iglu_example_data/example_data_hall.csv"],
     "metrics": ["test/rmse_30min", "test/mae_30min", "test/rmse_60min", "test/mae_60min"], "budgets": [2]},
]
