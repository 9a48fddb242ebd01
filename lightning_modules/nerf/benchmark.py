"""NeRF's profiles for `python -m bench.quality` (time to quality on its benchmark scenes)."""

QUALITY = [
    {"name": "fox", "overrides": ["experiment=nerf_fox", "data.data_dir={data}/nerf/fox"],
     "metrics": ["test/psnr", "test/ssim", "train/rays_per_sec"], "budgets": [2]},
    {"name": "builtin_occupancy", "overrides": ["experiment=nerf_builtin_occupancy"],
     "metrics": ["test/psnr", "test/ssim", "train/rays_per_sec"], "budgets": [2]},
]
