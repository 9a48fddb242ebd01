"""Training throughput of the plate detector: through run.py vs a plain PyTorch loop.

Both use the same composed config: same datamodule (workers, batch), same torchvision model,
same precision (autocast dtype), same optimizer and gradient clipping. Images/s are timed over
`--steps` steps after `--warmup` steps, with one device sync at each end of the window.

    python -m tests.license_plate.bench_throughput                       # experiment=license_plate_synth_pretrain
    python -m tests.license_plate.bench_throughput --steps 100 batch_size=32
    python -m tests.license_plate.bench_throughput --cpu-smoke           # tiny, to check it runs

Prints one line per path and their ratio (run.py / plain; the target is >= 0.95).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[2]
RESULT: dict[str, float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Images/s over training steps warmup..warmup+steps, then stops the run."""

    def __init__(self, warmup: int = 10, steps: int = 50) -> None:
        self.warmup, self.steps, self.images, self.start, self.count = warmup, steps, 0, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()
        if self.start is not None:
            self.images += len(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.count += 1
        if self.count == self.warmup + self.steps:
            _sync(pl_module.device)
            RESULT["run.py"] = self.images / (time.perf_counter() - self.start)
            trainer.should_stop = True


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import suite.resolvers  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(ROOT / "logs" / "license_plate" / f"bench_{time.strftime('%H%M%S')}")
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def plain_loop(cfg, warmup: int, steps: int) -> float:
    from hydra.utils import instantiate

    from suite import hardware

    accelerator = hardware.resolve_accelerator(cfg.trainer.accelerator)
    precision = str(hardware.resolve_precision(cfg.trainer.precision, accelerator))
    device = torch.device("cuda" if accelerator in ("cuda", "gpu") else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model).to(device).train()
    optimizer = instantiate(cfg.optimizer)(params=model.parameter_groups())
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    clip = cfg.trainer.get("gradient_clip_val")
    images, start = 0, None
    if device.type == "cuda":  # make_loader pins memory only under a GPU trainer; pin here too, as run.py does
        from types import SimpleNamespace

        datamodule.trainer = SimpleNamespace(accelerator=SimpleNamespace(), world_size=1)
    loader = datamodule.train_dataloader()
    step = 0
    while step < warmup + steps:
        for batch_images, targets in loader:
            if step == warmup:
                _sync(device)
                start = time.perf_counter()
            batch_images = [i.to(device, non_blocking=True) for i in batch_images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model.training_step((batch_images, targets), step)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if start is not None:
                images += len(batch_images)
            step += 1
            if step == warmup + steps:
                break
    _sync(device)
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, to check the script")
    args, overrides = parser.parse_known_args(argv)
    base = ["experiment=license_plate_synth_pretrain", "logger=csv", "print_config=false", "max_epochs=1",
            "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0",
            "model.val_loss=false",
            f"+callbacks.step_timer={{_target_: tests.license_plate.bench_throughput.StepTimer, "
            f"warmup: {args.warmup}, steps: {args.steps}}}"]
    if args.cpu_smoke:
        base += ["device=cpu", "num_workers=0", "batch_size=2", "data.image_size=128", "model.min_size=128",
                 "model.max_size=160", "data.synthetic_counts={train: 16, val: 2, test: 2}",
                 "data.data_dir=${paths.data_dir}/license_plate_bench_smoke", "data.synthetic_size=[96,128]"]
    base.append("max_epochs=1000")   # the timer stops the run after warmup + steps batches
    cfg = compose(base + overrides)
    from suite.train import run

    run(cfg)
    # The timer was built by Hydra from the importable module, not from __main__.
    from tests.license_plate import bench_throughput as module

    RESULT.update(module.RESULT)
    plain_cfg = compose(base + overrides)
    RESULT["plain loop"] = plain_loop(plain_cfg, args.warmup, args.steps)
    for name, value in RESULT.items():
        print(f"{name:>10}: {value:8.1f} images/s  (batch {cfg.batch_size}, precision {cfg.trainer.precision})")
    if len(RESULT) == 2:
        print(f"     ratio: {RESULT['run.py'] / RESULT['plain loop']:.3f}  (run.py / plain loop; target >= 0.95)")


if __name__ == "__main__":
    main()
