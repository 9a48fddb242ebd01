"""Diffusion's profiles for `python -m bench.quality`."""

QUALITY = [
    {"name": "mnist_cond", "overrides": ["experiment=mnist_cond", "data.data_dir={data}/diffusion/mnist"],
     "metrics": ["test/cond_accuracy", "test/fd_classifier_ratio", "test/fd_classifier",
                 "test/cond_accuracy_g1", "test/fd_classifier_ratio_g1",
                 "test/cond_accuracy_g2_t0-999", "test/fd_classifier_ratio_g2_t0-999"], "budgets": [7.5]},
]
