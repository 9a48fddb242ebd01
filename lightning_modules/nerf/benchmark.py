"""NeRF throughput benchmark: rays/s through run.py against a plain PyTorch loop, per renderer.

    python -m lightning_modules.nerf.benchmark                       # built-in scene, both renderers
    python -m lightning_modules.nerf.benchmark --steps 300 --warmup 500 --renderers occupancy
    python -m lightning_modules.nerf.benchmark --override data.data_dir=../shared/data/nerf/fox \
        --override data.generate_default=false --override data.downscale=4

For each renderer it trains `warmup + steps` steps twice from the same seed, once through
`suite.train.run` (Lightning, the model config's precision, logging, callbacks) and once in a
plain loop over the same datamodule batches, network, optimizer and autocast precision, and
times the last `steps` (the occupancy grid prunes during warm-up). The GPU is synchronised only
at the start and end of the timed window. Prints one table; `ratio` = run.py / plain.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class RaysPerSecond(Callback):
    """Logs `train/rays_per_sec` over the optimizer steps after `warmup` (two GPU syncs in all)."""

    last: float | None = None  # the latest measurement in this process, for the benchmark

    def __init__(self, warmup: int = 50) -> None:
        self.warmup = warmup
        self.t0 = None
        self.start_step = 0
        self.rays = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.t0 is None and trainer.global_step >= self.warmup:
            _sync(pl_module.device)
            self.t0, self.start_step = time.perf_counter(), trainer.global_step
        self.rays = int(batch["origins"].shape[0])

    def on_train_end(self, trainer, pl_module):
        if self.t0 is None or trainer.global_step <= self.start_step:
            log.warning("RaysPerSecond: fewer than warmup=%d steps ran; nothing measured", self.warmup)
            return
        _sync(pl_module.device)
        elapsed = time.perf_counter() - self.t0
        steps = trainer.global_step - self.start_step
        RaysPerSecond.last = steps * self.rays / elapsed
        log.info("train/rays_per_sec=%.0f over %d steps (%.1f s)", RaysPerSecond.last, steps, elapsed)
        for logger in trainer.loggers:
            logger.log_metrics({"train/rays_per_sec": RaysPerSecond.last}, step=trainer.global_step)


def _compose(out: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import suite.resolvers  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def through_run(out: Path, overrides: list[str], steps: int, warmup: int) -> float:
    from suite.train import run

    total = steps + warmup
    cfg = _compose(out, ["model=nerf", "logger=csv", "print_config=false", "max_epochs=1",
                         f"data.steps_per_epoch={total}", "trainer.limit_val_batches=0",
                         "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0",
                         f"+callbacks.rays_per_sec={{_target_: {__name__}.RaysPerSecond, warmup: {warmup}}}",
                         *overrides])
    RaysPerSecond.last = None
    run(cfg)
    return RaysPerSecond.last or float("nan")


def plain_loop(out: Path, overrides: list[str], steps: int, warmup: int) -> float:
    """The same datamodule, network, optimizer and precision, with nothing of Lightning around it."""
    from hydra.utils import instantiate

    from suite import hardware

    cfg = _compose(out, ["model=nerf", "logger=csv", "print_config=false", *overrides])
    torch.manual_seed(cfg.seed)
    accelerator = hardware.resolve_accelerator(cfg.device)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    precision = hardware.resolve_precision(cfg.precision, accelerator)
    if device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    dm = instantiate(cfg.data)
    dm.hparams.steps_per_epoch = steps + warmup
    dm.prepare_data()
    dm.build_ray_buffer(device if dm.hparams.ray_device == "auto" else dm.hparams.ray_device)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer)).to(device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    t0 = None
    for i, batch in enumerate(dm.train_dataloader()):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_step(batch, i)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return steps * dm.hparams.num_rays / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed steps")
    parser.add_argument("--warmup", type=int, default=500, help="untimed steps first (grid pruning, compile)")
    parser.add_argument("--renderers", nargs="+", default=["vanilla", "occupancy"])
    parser.add_argument("--override", action="append", default=[], help="a Hydra override, repeatable")
    parser.add_argument("--out", default="bench_out/nerf")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    warnings_filter()
    rows = []
    for renderer in args.renderers:
        overrides = [f"model.renderer={renderer}", *args.override]
        stamp = f"{renderer}_{int(time.time())}"
        lightning = through_run(Path(args.out) / f"run_{stamp}", overrides, args.steps, args.warmup)
        plain = plain_loop(Path(args.out) / f"plain_{stamp}", overrides, args.steps, args.warmup)
        rows.append((renderer, lightning, plain))
    print("\nrenderer     run.py rays/s   plain rays/s   run.py/plain")
    for renderer, lightning, plain in rows:
        print(f"{renderer:<12} {lightning:>13,.0f}   {plain:>12,.0f}   {lightning / plain:>11.3f}")
    by = {r: lt for r, lt, _ in rows}
    if "vanilla" in by and "occupancy" in by:
        print(f"occupancy / vanilla (run.py): {by['occupancy'] / by['vanilla']:.2f}x")


def warnings_filter() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")


if __name__ == "__main__":
    main()
