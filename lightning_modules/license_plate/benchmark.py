"""License-plate detection's profiles for `python -m bench.quality` (from scratch on the real photos;
the synthetic-pretraining route is two runs, see docs/tasks/license_plate.md)."""

QUALITY = [
    {"name": "openalpr_eu", "overrides": [
        "experiment=license_plate_openalpr_eu", "data.data_dir={data}/license_plate/openalpr_benchmarks/endtoend/eu"],
     "metrics": ["test/map_50", "test/map"], "budgets": [4]},
]
