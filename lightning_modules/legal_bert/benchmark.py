"""Training throughput of legal_bert, side by side in one process: run.py vs a plain PyTorch loop vs
the Hugging Face Trainer, on the same model, data, batch size, precision and schedule.

    python -m lightning_modules.legal_bert.benchmark --data-dir ../shared/data/legal/claudette_ToS_50
    python -m lightning_modules.legal_bert.benchmark --fixed-length      # every batch padded to 512

Each contender trains `--steps` optimizer steps; samples/s is measured over the steps after
`--warmup` (CUDA synchronised only at the two ends of that window). The run-through-run.py number
comes from `suite.train.run`, the function run.py calls, on `experiment=unfair_tos` (validation and
test off). The plain loop calls the module's own `training_step` on the datamodule's batches. The
HF Trainer (needs the `accelerate` package) trains the same module, wrapped to return its loss,
with its own length-grouped sampler and padding collator. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[2]


class StepTimer(L.Callback):
    """samples/s over optimizer steps [warmup, warmup + measure); results written to `path` as JSON."""

    def __init__(self, path: str, warmup: int = 20, measure: int = 100) -> None:
        self.path, self.warmup, self.measure = path, warmup, measure
        self.samples, self.t0, self.done = 0, None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step == self.warmup and self.t0 is None:
            _sync()
            self.t0 = time.perf_counter()
        if self.t0 is not None and not self.done:
            self.samples += len(batch["input_ids"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is not None and not self.done and trainer.global_step >= self.warmup + self.measure:
            _sync()
            seconds = time.perf_counter() - self.t0
            self.done = True
            Path(self.path).write_text(json.dumps({"samples": self.samples, "seconds": seconds,
                                                   "samples_per_s": self.samples / seconds}))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compose(overrides: list[str], root: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import suite.resolvers  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(root / f"run_{time.time_ns()}")
        cfg.hydra.job.num = 0
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


def bench_lightning(args, overrides, out: Path) -> dict:
    from omegaconf import open_dict

    from suite.train import run

    result = out / "lightning.json"
    cfg = compose(overrides + [f"trainer.max_steps={args.warmup + args.steps + 1}", "max_epochs=1000",
                               "trainer.limit_val_batches=0", "trainer.limit_test_batches=0",
                               "trainer.num_sanity_val_steps=0", "logger=none", "print_config=false"], out)
    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": f"{__name__}.StepTimer", "path": str(result),
                                    "warmup": args.warmup, "measure": args.steps}
    run(cfg)
    return json.loads(result.read_text())


def _setup(args, overrides, out: Path):
    from hydra.utils import instantiate

    cfg = compose(overrides, out)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    L.seed_everything(cfg.seed)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    model._build_head(datamodule.label_names, datamodule.multi_label, datamodule.label_counts,
                      datamodule.num_train_examples)
    return cfg, datamodule, model


def _autocast(cfg):
    precision = str(cfg.trainer.precision)
    if precision == "auto":
        from suite import hardware

        precision = hardware.resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return precision, (lambda: torch.autocast(device, dtype=dtype)) if dtype else (lambda: torch.autocast(device, enabled=False))


def bench_plain(args, overrides, out: Path) -> dict:
    cfg, datamodule, model = _setup(args, overrides, out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    if cfg.model.get("compile"):
        model.__dict__["_compiled_encoder"] = torch.compile(model.encoder, dynamic=True)
    optimizer = model.optimizer_factory(params=model.parameter_groups())
    total = args.warmup + args.steps + 1
    scheduler = model.scheduler_config["builder"](optimizer, total_steps=total) if model.scheduler_config else None
    precision, autocast = _autocast(cfg)
    scaler = torch.amp.GradScaler(enabled=precision.startswith("16"))
    clip = cfg.get("gradient_clip_val")
    loader = datamodule.train_dataloader()
    samples, t0 = 0, None
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(total):
        batch = next(batches)
        if step == args.warmup:
            _sync()
            t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast():
            loss = model.training_step(batch, step)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if t0 is not None:
            samples += len(batch["input_ids"])
        if step == args.warmup + args.steps - 1:
            break
    _sync()
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def bench_hf(args, overrides, out: Path) -> dict:
    try:
        import accelerate  # noqa: F401
        from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
    except ImportError as err:
        return {"skipped": f"Hugging Face Trainer unavailable ({err}); pip install accelerate"}
    cfg, datamodule, model = _setup(args, overrides, out)
    dataset = datamodule.train_set

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            item = dataset[i]
            return {"input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist()}

    class Wrapped(torch.nn.Module):
        """The same module; HF Trainer wants forward(**batch) -> {'loss': ...}."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, labels):
            return {"loss": self.inner.loss(self.inner(input_ids, attention_mask), labels)}

    timer = {"samples": 0, "t0": None}

    class Timer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup and timer["t0"] is None:
                _sync()
                timer["t0"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if timer["t0"] is not None and "seconds" not in timer:
                timer["samples"] += args.batch_size
                if state.global_step >= args.warmup + args.steps:
                    _sync()
                    timer["seconds"] = time.perf_counter() - timer["t0"]

    precision, _ = _autocast(cfg)
    pad_to = datamodule.max_sequence_length if args.fixed_length else (datamodule.pad_to_multiple_of or None)
    collator = DataCollatorWithPadding(datamodule.tokenizer, padding="max_length" if args.fixed_length else True,
                                       max_length=datamodule.max_sequence_length if args.fixed_length else None,
                                       pad_to_multiple_of=None if args.fixed_length else pad_to)
    hf_args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps + 1, learning_rate=float(cfg.optimizer.lr),
        weight_decay=float(cfg.optimizer.weight_decay), warmup_steps=int(0.1 * (args.warmup + args.steps + 1)), lr_scheduler_type="linear",
        max_grad_norm=float(cfg.get("gradient_clip_val") or 0.0), bf16=precision.startswith("bf16"),
        fp16=precision.startswith("16"),
        train_sampling_strategy="group_by_length" if datamodule.group_by_length else "random",
        dataloader_num_workers=int(cfg.num_workers), dataloader_pin_memory=True, logging_steps=10_000,
        save_strategy="no", report_to=[], seed=int(cfg.seed), disable_tqdm=True, remove_unused_columns=False,
        torch_compile=bool(cfg.model.get("compile")),
        optim="adamw_torch_fused" if cfg.optimizer.get("fused") else "adamw_torch",  # the same optimizer as ours
    )
    Trainer(model=Wrapped(model), args=hf_args, train_dataset=Rows(), data_collator=collator,
            callbacks=[Timer()]).train()
    return {"samples": timer["samples"], "seconds": timer["seconds"],
            "samples_per_s": timer["samples"] / timer["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "legal" / "claudette_ToS_50"))
    parser.add_argument("--experiment", default="unfair_tos")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=30, help="steps before measuring (cudnn, allocator, compile)")
    parser.add_argument("--fixed-length", action="store_true", help="pad every batch to max_sequence_length (512)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--only", default="lightning,plain,hf", help="comma list of contenders")
    parser.add_argument("--out", default=None, help="where to write results (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model.compile=true")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="legal_bert_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"experiment={args.experiment}", f"data.data_dir={args.data_dir}", f"batch_size={args.batch_size}",
                 f"num_workers={args.num_workers}", f"paths.root_dir={out}", f"paths.data_dir={out / 'data'}",
                 f"data.cache_dir={out / 'cache'}"]
    if args.fixed_length:
        overrides.append("data.pad_to_multiple_of=${data.max_sequence_length}")
    overrides += args.overrides
    if not torch.cuda.is_available():
        print("note: no CUDA GPU; numbers are CPU numbers", file=sys.stderr)
    results = {}
    runners = {"lightning": bench_lightning, "plain": bench_plain, "hf": bench_hf}
    for name in args.only.split(","):
        results[name] = runners[name](args, overrides, out)
        print(f"{name}: {results[name]}", flush=True)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "batch_size": args.batch_size, "fixed_length": args.fixed_length, "steps": args.steps,
              "overrides": overrides, "results": results}
    light = results.get("lightning", {}).get("samples_per_s")
    for other in ("plain", "hf"):
        value = results.get(other, {}).get("samples_per_s")
        if light and value:
            report[f"lightning_over_{other}"] = light / value
    print("\ncontender   samples/s")
    for name, r in results.items():
        print(f"{name:<11} {r.get('samples_per_s', float('nan')):9.1f}  {r.get('skipped', '')}")
    if "lightning_over_plain" in report:
        ok = report["lightning_over_plain"] >= 0.95
        print(f"run.py / plain loop = {report['lightning_over_plain']:.3f}  (target >= 0.95: {'PASS' if ok else 'FAIL'})")
    if "lightning_over_hf" in report:
        ok = report["lightning_over_hf"] >= 1.0
        print(f"run.py / HF Trainer = {report['lightning_over_hf']:.3f}  (target >= 1.00: {'PASS' if ok else 'FAIL'})")
    (out / "throughput.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'throughput.json'}")
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
