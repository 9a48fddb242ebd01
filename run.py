"""Train, evaluate or predict with any task of the suite.

    python run.py                                  # default task, default settings
    python run.py model=nerf trainer.devices=4     # pick a task, override anything
    python run.py -m model=diffusion optimizer.lr=1e-4,2e-4   # a Hydra multirun sweep
    python run.py --help                           # every config group and its choices
"""
import sys

import hydra
from omegaconf import DictConfig

import suite.resolvers  # noqa: F401  (registers ${suite.*} before the config is composed)
from suite.compose import checkpoint_task, moved_setting
from suite.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    # `mode=predict ckpt_path=<nerf ckpt> data.path_frames=2`: compose against the checkpoint's task,
    # or its settings are unknown keys of the default task (DDP ranks re-run this same command line)
    sys.argv += checkpoint_task(sys.argv[1:])
    moved = moved_setting(sys.argv[1:])  # model.d_model=64 from before model.net: say what it is now
    if moved:
        sys.exit(f"Error: {moved}")
    main()
