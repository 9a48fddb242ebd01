"""What one row of the benchmark measures: the suite (run.py's flow), Lightning alone, and the plain
eager loop, each given its overrides and a `Windows` to time its steps with; plus `prepare_task`,
the task set up outside Lightning, which the plain loop and a task's peer start from.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.model_helpers import is_overridden

from bench.timing import STEP_HOOKS, WindowTimer
from common.timing import Windows, synchronize
from suite.compose import compose_config
from suite.config_checks import check_applicable, inapplicable_settings, model_setting, parse_overrides
from suite.hardware import resolve_precision
from suite.train import run

log = logging.getLogger("bench")

SEARCH_PATH = None  # an extra config dir (the tests' tiny task)


# ---- between rows ---------------------------------------------------------------------------------
_BACKENDS: dict | None = None


def fresh_process_state(device: torch.device) -> None:
    """Before each row: what earlier rows left in this process is undone, so a row measures as if it ran
    first. The suite's run sets the matmul precision and cuDNN autotuning globally; compiled graphs of
    an earlier row would be reused instead of compiled (time to first step); their memory would count."""
    global _BACKENDS
    if _BACKENDS is None:
        _BACKENDS = {"matmul": torch.get_float32_matmul_precision(), "cudnn": torch.backends.cudnn.benchmark}
    torch.set_float32_matmul_precision(_BACKENDS["matmul"])
    torch.backends.cudnn.benchmark = _BACKENDS["cudnn"]
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory(device) -> dict:
    return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


# ---- the suite ------------------------------------------------------------------------------------
def applicable(overrides: list[str], optional: list[str], root: Path) -> list[str]:
    """`overrides` less those of `optional` (a CPU dry run's shrink, a user's -o for the task) that their
    configuration would ignore: rows or profiles with different renderers share one -o list (nerf's vanilla sample
    counts, the occupancy grid's settings) and each takes what it reads. Callers refuse an -o that none reads."""
    if not optional:
        return overrides
    unused = inapplicable_settings(compose_config(root, *overrides, search_path=SEARCH_PATH))
    ignored = {line for key, _, line in parse_overrides(list(optional)) if model_setting(key) in unused}
    kept = [o for o in overrides if o not in ignored]
    if len(kept) < len(overrides):
        log.info("running without %s (this configuration would ignore them)", sorted(set(overrides) - set(kept)))
    return kept


def training_only(steps: int) -> list[str]:
    """Overrides for a run that trains `steps` steps and does nothing else: no sanity check, validation or test."""
    return [f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "trainer.limit_test_batches=0", "max_epochs=-1", "print_config=false"]


def measure_suite(task_root: Path, overrides: list[str], w: Windows, time_hooks: bool = False) -> dict:
    """The suite's run as users start it, timed; `time_hooks`: with each callback's per-step host time (hook_ms)."""
    cfg = compose_config(task_root, *overrides, *training_only(w.total_steps),  # the profiler times batch fetches
                         f"trainer.profiler={{_target_:bench.timing.FetchProfiler,time_hooks:{str(time_hooks).lower()}}}",
                         output_dir=task_root, search_path=SEARCH_PATH)
    if w.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = WindowTimer(w)
    run(cfg, extra_callbacks=[timer])  # the timer joins the configured callbacks; the rest is as users run it
    hooks = timer.hook_ms()
    return {**w.summary(), **memory(w.device), **({"hook_ms": hooks} if hooks else {})}


def measure_lightning(task_root: Path, overrides: list[str], w: Windows) -> dict:
    """The suite's run without its callbacks and logging, and without the checkpointing, progress bar
    and summary Lightning adds when none are configured: what Lightning's loop alone costs. It runs eager
    (harness.row_plan), beside the suite's eager row and the plain eager loop."""
    return measure_suite(task_root, [*overrides, "callbacks=none", "logger=none", "+trainer.enable_checkpointing=false",
                                     "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"], w)



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


# ---- the plain loop -------------------------------------------------------------------------------
def _transfer(model, dm, batch, device):
    for hook in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer"):
        owner = dm if is_overridden(hook, dm) else model
        batch = getattr(owner, hook)(batch, device, 0) if hook == "transfer_batch_to_device" else getattr(owner, hook)(batch, 0)
    return batch


def prepare_task(task_root: Path, overrides: list[str], device: torch.device, check: bool = True):
    """(cfg, datamodule, module, precision) set up for training outside Lightning, as the Trainer
    would leave them: data set up, the module's fit-time hooks run, the module on `device`. The plain
    loop and a task's peer both start from here, with the config's GPU settings (TF32 matmuls, cuDNN
    autotuning) applied as the suite applies them, so every row computes with the same numerics."""
    cfg = compose_config(task_root, *overrides, output_dir=task_root, search_path=SEARCH_PATH)
    if check:  # as run.py refuses them for the suite's rows; a peer, whose own network reads the sizes, does not
        check_applicable(cfg, overrides)
    L.seed_everything(cfg.seed, workers=True)
    if device.type == "cuda":
        cuda = cfg.get("cuda") or {}
        torch.set_float32_matmul_precision(cuda.get("matmul_precision", "high"))
        torch.backends.cudnn.benchmark = bool(cuda.get("cudnn_benchmark", True)) and not cfg.get("deterministic")
    dm = instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=None)
    dm.prepare_data()
    dm.setup("fit")
    # The module's setup binds the datamodule's TaskData (label names, scaling) and its fit-start hooks
    # read the trainer: give them a stand-in for the duration, then detach it so self.log is a no-op.
    model.trainer = SimpleNamespace(datamodule=dm, ckpt_path=None, world_size=1, global_rank=0, is_global_zero=True,
                                    current_epoch=0, global_step=0, default_root_dir=str(task_root),
                                    strategy=SimpleNamespace(root_device=device))
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
    """A plain PyTorch loop over the same datamodule batches, calling the module's own training_step,
    with the same optimizer, autocast and gradient clipping, and nothing else. One eager step in the
    warm-up runs under FlopCounterMode: the FLOPs a step, which every row of the same work shares."""
    device = w.device
    cfg, dm, model, precision = prepare_task(task_root, overrides, device)
    optimizer = instantiate(cfg.optimizer)(params=model.parameter_groups())
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=dtype is torch.float16)
    clip = cfg.get("gradient_clip_val")
    compiled = model.compile_decision.on  # the module's own decision, not the setting's spelling
    loader = dm.train_dataloader()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    flops = None
    last_end = None
    count_at = max(w.warmup - 1, 0)
    for step in range(w.total_steps):
        fetch_start = time.perf_counter()
        batch = _transfer(model, dm, next(batches), device)
        now = time.perf_counter()
        w.before_step(step, now - last_end if last_end else 0.0, now - fetch_start)
        # FLOPs are counted on an eager step: counting under a compiled (CUDA-graph) function sent that
        # loop back to eager speed for the rest of the run.
        counter = flop_counter() if step == count_at and not compiled else None
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
        w.after_step(step, model.items_trained(batch))  # as the suite's rows count: what the step trained on
        last_end = time.perf_counter()
    synchronize(device)
    return {**w.summary(), **memory(device), "flops_per_step": flops, "precision": precision}


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)
