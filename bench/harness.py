"""Training throughput of every task: the suite as users run it beside a plain PyTorch loop.

    python -m bench                         # every task; tiny settings on CPU, the benchmark profile on a GPU
    python -m bench --tasks diffusion --compile
    python -m bench --tasks nerf -o nerf:model.num_importance=0
    python -m bench --tasks diffusion --explain   # + the suite without each per-step callback: what each costs

For each task, with the same network, batch, precision and data:
  suite  `suite.train.run` (run.py's flow: Trainer, callbacks, W&B/CSV logging), validation off
  plain  a loop over the same datamodule batches calling the module's own training_step,
         with the same optimizer, autocast and gradient clipping, and nothing else
  peer   where the task offers one (`lightning_modules.<task>.benchmark.peer`, given the task set up
         as for the plain loop): legal_bert's is the Hugging Face Trainer; the table adds suite / peer
  lightning  (with --impls) the suite's Trainer and module with no callbacks and no logger: Lightning's
         own loop, so the suite's gap to plain splits into Lightning's share and the callbacks' share
  --explain  the suite again once per callback that has a per-step hook, with that callback off, so
         the table says where the suite's time beyond the plain loop goes
On a GPU the task's `experiment=bench_<task>` profile is used when it exists. Warm-up steps are
excluded; the GPU is synchronised only at window boundaries. Results: JSON and a Markdown table
under bench_out/<timestamp>/.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import itertools
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from bench.timing import WindowTimer, merge_rounds
from common.timing import Windows, synchronize
from suite.compose import CONF, ROOT, compose_config
from suite.hardware import resolve_precision
from suite.train import run

log = logging.getLogger("bench")
SEARCH_PATH = None  # an extra config dir (the tests' tiny task)

# Dense bf16 tensor-core peaks, for model FLOPs utilisation.
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def tasks() -> list[str]:
    return sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def task_overrides(task: str, gpu: bool, extra: list[str], compile_: bool) -> list[str]:
    overrides = [f"model={task}", "logger=csv"]
    if gpu and (CONF / "experiment" / f"bench_{task}.yaml").is_file():
        overrides.append(f"experiment=bench_{task}")
    if not gpu:
        overrides += ["device=cpu", "num_workers=0"]
    if compile_:
        overrides.append("model.compile=true")
    return overrides + extra


def _peak_bf16() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ---- the suite ------------------------------------------------------------------------------------
def measure_suite(task_root: Path, overrides: list[str], w: Windows) -> dict:
    cfg = compose_config(task_root, *overrides, f"trainer.max_steps={w.total_steps}", "trainer.limit_val_batches=0",
                         "trainer.num_sanity_val_steps=0", "trainer.limit_test_batches=0", "max_epochs=-1",
                         "print_config=false", output_dir=task_root, search_path=SEARCH_PATH)
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(cfg, extra_callbacks=[WindowTimer(w)])  # the timer joins the configured callbacks; the rest is as users run it
    return {**w.summary(), **_memory(w.device)}


def measure_lightning(task_root: Path, overrides: list[str], w: Windows) -> dict:
    """The suite's run without its callbacks and logging, and without the checkpointing, progress bar
    and summary Lightning adds when none are configured: what Lightning's loop alone costs."""
    return measure_suite(task_root, [*overrides, "callbacks=none", "logger=none", "+trainer.enable_checkpointing=false",
                                     "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"], w)


# Hooks Lightning calls on every training step: only callbacks with one of these can cost throughput.
STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
              "on_before_optimizer_step", "on_before_zero_grad")


def per_step_callbacks(task_root: Path, overrides: list[str]) -> list[str]:
    """Config keys (callbacks.<key>) of the configured callbacks that run a hook on every step."""
    cfg = compose_config(task_root, *overrides, output_dir=task_root, search_path=SEARCH_PATH)
    keys = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None or "_target_" not in node:
            continue
        callback = instantiate(node)
        if isinstance(callback, Checkpoint):  # its per-step hook only counts steps; and the run needs it
            continue
        if any(is_overridden(hook, callback, L.Callback) for hook in STEP_HOOKS):
            keys.append(key)
    return keys


def explain_suite(task_root: Path, overrides: list[str], windows) -> dict[str, dict]:
    """The suite measured again once per per-step callback, with that callback removed: what each costs."""
    return {key: measure_suite(task_root / f"without-{key}", [*overrides, f"callbacks.{key}=null"], windows())
            for key in per_step_callbacks(task_root, overrides)}


# ---- the plain loop -------------------------------------------------------------------------------
def _transfer(model, dm, batch, device):
    for hook in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"):
        owner = dm if is_overridden(hook, dm) else model
        batch = getattr(owner, hook)(batch, device, 0) if hook == "transfer_batch_to_device" else getattr(owner, hook)(batch, 0)
    return batch


def prepare_task(task_root: Path, overrides: list[str], device: torch.device):
    """(cfg, datamodule, module, precision) set up for training outside Lightning, as the Trainer
    would leave them: data set up, the module's fit-time hooks run, the module on `device`. The plain
    loop and a task's peer both start from here."""
    cfg = compose_config(task_root, *overrides, output_dir=task_root, search_path=SEARCH_PATH)
    L.seed_everything(cfg.seed, workers=True)
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=None)
    dm.prepare_data()
    dm.setup("fit")
    # The module's setup binds the datamodule's TaskData (label names, scaling) and its fit-start hooks
    # read the trainer: give them a stand-in for the duration, then detach it so self.log is a no-op.
    model.trainer = SimpleNamespace(datamodule=dm, ckpt_path=None, world_size=1, global_rank=0, is_global_zero=True,
                                    current_epoch=0, global_step=0, default_root_dir=str(task_root))
    model.setup("fit")
    if is_overridden("configure_model", model):
        model.configure_model()
    model.to(device)
    model.on_fit_start()
    model.trainer = None
    model.train()
    precision = resolve_precision(str(cfg.trainer.precision), "gpu" if device.type == "cuda" else "cpu")
    return cfg, dm, model, precision


def measure_plain(task_root: Path, overrides: list[str], w: Windows) -> dict:
    device = w.device
    cfg, dm, model, precision = prepare_task(task_root, overrides, device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameter_groups())
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    clip = cfg.get("gradient_clip_val")
    compiled = bool(cfg.model.get("compile"))
    loader = dm.train_dataloader()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops = None
    last_end = None
    for step in range(w.total_steps):
        batch = _transfer(model, dm, next(batches), device)
        w.before_step(step, time.perf_counter() - last_end if last_end else 0.0)
        # FLOPs are counted on an eager step: counting under a compiled (CUDA-graph) function sent that
        # loop back to eager speed for the rest of the run. Compile rows reuse the eager row's count.
        counter = _flop_counter() if step == w.warmup - 1 and device.type == "cuda" and not compiled else None
        with counter or contextlib.nullcontext(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model.training_step(batch, step)
            scaler.scale(loss).backward()
        if counter is not None:
            flops = counter.get_total_flops()
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        w.after_step(step, model.batch_size_of(batch))
        last_end = time.perf_counter()
    synchronize(device)
    return {**w.summary(), **_memory(device), "flops_per_step": flops, "precision": precision}


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def _memory(device) -> dict:
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


# ---- report ---------------------------------------------------------------------------------------
def ratio_by_round(measured: list[dict], plain: list[dict]) -> list[float]:
    """Each round's throughput over the plain loop's in the same round: rounds run back to back, so
    their spread shows how much of a difference between rows the machine's own drift could make."""
    return [m["items_per_sec"] / p["items_per_sec"] for m, p in zip(measured, plain)
            if m.get("items_per_sec") and p.get("items_per_sec")]


def table(rows: list[dict]) -> str:
    head = ("| task | impl | unit/s | median step ms | spread ms | host CPU ms | peak GB | MFU | host wait | vs plain |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "")
        lines.append(f"| {r['task']} | {r['impl']} | {f('items_per_sec', '{:,.0f}')} {r.get('unit', '')} | "
                     f"{f('median_step_ms', '{:.2f}')} | {f('spread_ms', '{:.2f}')} | {f('host_cpu_ms', '{:.2f}')} | "
                     f"{f('peak_mem_gb', '{:.2f}')} | "
                     f"{f('mfu', '{:.1%}')} | {f('wait_share', '{:.1%}')} | {f('ratio', '{:.3f}')} |")
    peers = [f"- {r['task']}: suite / peer = {r['ratio_peer']:.3f}" for r in rows if r.get("ratio_peer")]
    peers += [f"- {r['task']}: {r['impl'].removeprefix('suite without ')} costs {r['saved_ms']:.2f} ms a step "
              f"(the suite's spread across windows: {r.get('noise_ms') or 0:.2f} ms)"
              for r in rows if r.get("saved_ms") is not None]
    peers += [f"- {r['task']}: {r['impl']} / plain by round {min(r['ratio_by_round']):.3f}-{max(r['ratio_by_round']):.3f} "
              f"(median {statistics.median(r['ratio_by_round']):.3f}): how far back-to-back measurements disagree"
              for r in rows if r.get("ratio_by_round")]
    errors = [f"- {r['task']} / {r['impl']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + peers if peers else []) + (["", "Failed:"] + errors if errors else []))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(tasks()))
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=None, help="timing windows (median and spread over them)")
    parser.add_argument("--compile", action="store_true", help="also measure with model.compile=true")
    parser.add_argument("--explain", action="store_true",
                        help="also measure the suite once without each callback that runs every step")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each implementation this many times, alternating between them; the table "
                             "takes the median over every round's windows (use 3 to judge a 5%% difference)")
    parser.add_argument("--impls", default="suite,plain,peer",
                        help="any of suite, plain, peer and lightning (the suite with no callbacks or logger)")
    parser.add_argument("-o", "--override", action="append", default=[], help="TASK:KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    warmup = args.warmup if args.warmup is not None else (30 if gpu else 2)
    steps = args.steps if args.steps is not None else (20 if gpu else 2)
    windows = args.windows if args.windows is not None else (5 if gpu else 2)
    out = Path(args.out or ROOT / "bench_out" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    peak = _peak_bf16()
    rows = []
    for task in args.tasks.split(","):
        extra = [o.split(":", 1)[1] for o in args.override if o.startswith(f"{task}:")]
        eager_flops = None
        for compiled in ([False, True] if args.compile else [False]):
            overrides = task_overrides(task, gpu, extra, compiled)
            label = task + (" (compile)" if compiled else "")
            unit = _unit(task)
            task_dir = out / f"{task}{'-compile' if compiled else ''}"
            rounds: dict[str, list[dict]] = {}
            for r, impl in itertools.product(range(args.rounds), args.impls.split(",")):
                root = task_dir / impl / (f"round{r + 1}" if args.rounds > 1 else "")
                fn = {"suite": measure_suite, "lightning": measure_lightning, "plain": measure_plain}.get(impl) or _peer(task)
                if fn is None:
                    continue
                log.info("== %s / %s%s: %s", label, impl, f" (round {r + 1})" if args.rounds > 1 else "",
                         " ".join(overrides))
                try:
                    result = fn(root, overrides, Windows(warmup, steps, windows, device))
                except Exception as err:  # one broken task must not hide the others' numbers
                    log.exception("%s / %s failed", label, impl)
                    result = {"error": f"{type(err).__name__}: {err}"[:300]}
                rounds.setdefault(impl, []).append(result)
            results = {impl: merge_rounds(measured) for impl, measured in rounds.items()}
            if args.explain and "items_per_sec" in results.get("suite", {}):
                log.info("== %s: the suite without each per-step callback", label)
                try:
                    without = explain_suite(task_dir / "explain", overrides,
                                            lambda: Windows(warmup, steps, windows, device))
                    results.update({f"suite without {key}": r for key, r in without.items()})
                except Exception as err:
                    log.exception("%s / explain failed", label)
                    results["suite without ?"] = {"error": f"{type(err).__name__}: {err}"[:300]}
            base = results.get("plain", {}).get("items_per_sec")
            peer = results.get("peer", {}).get("items_per_sec")
            flops = results.get("plain", {}).get("flops_per_step") or eager_flops  # same network and batch
            eager_flops = flops if not compiled else eager_flops
            for impl, r in results.items():
                name = f"peer: {_peer_name(task)}" if impl == "peer" else impl
                row = {"task": label, "impl": name, "unit": unit, **r}
                if base and r.get("items_per_sec"):
                    row["ratio"] = r["items_per_sec"] / base
                    if impl != "plain" and len(rounds.get(impl, [])) > 1:
                        row["ratio_by_round"] = ratio_by_round(rounds[impl], rounds.get("plain", []))
                if impl == "suite" and peer and r.get("items_per_sec"):
                    row["ratio_peer"] = r["items_per_sec"] / peer
                full = results.get("suite", {}).get("median_step_ms")
                if impl.startswith("suite without") and full and r.get("median_step_ms"):
                    row["saved_ms"] = full - r["median_step_ms"]  # what that callback costs a step
                    row["noise_ms"] = results["suite"].get("spread_ms")  # differences below it are noise
                if flops and peak and r.get("median_step_ms"):
                    row["mfu"] = flops / (r["median_step_ms"] / 1e3) / peak
                rows.append(row)
            write_results(out, rows, warmup, steps, windows, args.rounds)  # after each task: a pass cut short keeps its numbers
    md = write_results(out, rows, warmup, steps, windows, args.rounds)
    print(md)
    print(f"written to {out}")
    return rows


def write_results(out: Path, rows: list[dict], warmup: int, steps: int, windows: int, rounds: int = 1) -> str:
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": _device_name(), "torch": torch.__version__,
            "host": platform.node(), "warmup": warmup, "steps": steps, "windows": windows, "rounds": rounds}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    md = (f"{meta['date']} on {meta['device']} (torch {meta['torch']}); warm-up {warmup}, {windows} windows x {steps} steps"
          f"{f', {rounds} alternating rounds' if rounds > 1 else ''}\n\n{table(rows)}\n")
    (out / "results.md").write_text(md)
    return md


def _unit(task: str) -> str:
    target = compose_config(ROOT / "bench_out" / ".compose", f"model={task}", search_path=SEARCH_PATH).model._target_
    return getattr(get_class(target), "throughput_unit", "samples")


def _peer(task: str):
    """The task's `peer(task_root, prepared, windows)` as a measurement like the others: it gets the task
    prepared as the plain loop starts (`prepare_task`), so the task's own file needs nothing of bench."""
    try:
        module = importlib.import_module(f"lightning_modules.{task}.benchmark")
    except ImportError:
        return None
    peer = getattr(module, "peer", None)
    if peer is None:
        return None
    return lambda task_root, overrides, w: peer(task_root, prepare_task(task_root, overrides, w.device), w)


def _peer_name(task: str) -> str:
    return getattr(importlib.import_module(f"lightning_modules.{task}.benchmark"), "PEER_NAME", "peer")


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
