"""License-plate detection's profiles for `python -m bench.quality` (from scratch on the real photos;
the synthetic-pretraining route is two runs, see docs/tasks/license_plate.md)."""

# `python -m bench` on a CPU checks that the rows run: two images a batch at half the size, seconds a step
# `python -m bench` on a GPU: images differ in size, so the first steps of each row autotune kernels for new shapes
MIN_WARMUP = 40
CPU_OVERRIDES = ["batch_size=2", "data.image_size=160", "model.net.min_size=160", "model.net.max_size=320"]

QUALITY = [
    {"name": "openalpr_eu", "overrides": [
        "experiment=license_plate_openalpr_eu", "data.data_dir={data}/license_plate/openalpr_benchmarks/endtoend/eu"],
     "metrics": ["test/map_50", "test/map"], "budgets": [4]},
]
