"""Where a training step's time goes, for one task run as users run it (suite default unless overridden):

    python -m bench.step_profile diffusion experiment=bench_diffusion
    python -m bench.step_profile nerf model.compile=false --start 30 --steps 5

After `--start` steps it watches `--steps` steps and prints: the step time; the GPU's busy share (kernel
time over wall time: a share well under 100% means the host, not the GPU, sets the pace); the kernels
by kind (matmuls, convolutions, cuDNN layout conversions, attention, optimizer, fused or elementwise);
every host synchronisation with the frames that asked for it (torch.cuda.set_sync_debug_mode); the top
host operations; and dynamo's graph breaks. The profiler table goes to <run dir>/step_profile.txt.
Profiling adds host time to every launch, so a host-bound step is slower here than in `python -m bench`;
compare its busy share between tasks or commits, and take step times from the bench.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

from bench.rows import training_only
from suite.compose import ROOT, compose_config
from suite.train import run

KINDS = (("layout", r"nchwToNhwc|nhwcToNchw"), ("attention", r"sdpa|flash|fmha|attention"),
         ("convolution", r"dgrad|wgrad|fprop|conv"), ("matmul", r"gemm|nvjet|xmma|cutlass|cublas"),
         ("optimizer", r"adam|multi_tensor"))


def kind(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.I)), "fused or elementwise")


class StepProfile(L.Callback):
    """Profiles steps [start, start + steps) of a fit, then stops it."""

    def __init__(self, start: int, steps: int, report: Path) -> None:
        self.start, self.steps, self.report, self.seen = start, steps, report, 0
        self.syncs: collections.Counter[str] = collections.Counter()

    def _sync_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            self._showwarning(message, category, filename, lineno, file, line)  # others are shown as usual
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "site-packages/torch/" not in f.filename]
        self.syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-6:][::-1])] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen != self.start:
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            self._filters = warnings.filters[:]
            warnings.simplefilter("always")
            self._showwarning, warnings.showwarning = warnings.showwarning, self._sync_warning
            torch.cuda.set_sync_debug_mode("warn")
        self.profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        self.profiler.__enter__()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen != self.start + self.steps:
            return
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            warnings.showwarning, warnings.filters[:] = self._showwarning, self._filters
        wall = (time.perf_counter() - self.t0) / self.steps
        self.profiler.__exit__(None, None, None)
        events = self.profiler.key_averages()
        print(summary(events, wall, self.steps, self.syncs))
        self.report.write_text(events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90)
                               + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=40))
        print(f"profiler tables: {self.report}")
        trainer.should_stop = True


def summary(events, wall: float, steps: int, syncs: collections.Counter) -> str:
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    by_kind: collections.Counter[str] = collections.Counter()
    for e in kernels:
        by_kind[kind(e.key)] += e.self_device_time_total / 1e3 / steps
    busy = sum(by_kind.values())
    lines = [f"step: {1e3 * wall:.2f} ms (mean of {steps})",
             f"GPU kernels: {busy:.2f} ms a step, busy {busy / (1e3 * wall):.0%}" if kernels else "GPU kernels: none (CPU)"]
    lines += [f"  {name:<22} {ms:7.2f} ms  {ms / busy:5.1%}" for name, ms in by_kind.most_common()]
    host = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    lines.append("host, top self time a step: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3 / steps:.2f} ms"
                                                            for e in host))
    lines.append(f"host syncs in {steps} steps: {sum(syncs.values())}")
    lines += [f"  {n:4d}  {where}" for where, n in syncs.most_common(8)]
    from torch._dynamo.utils import counters

    lines.append(f"dynamo graph breaks: {dict(counters['graph_break']) or 'none'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task")
    parser.add_argument("overrides", nargs="*", help="config overrides, as run.py takes them")
    parser.add_argument("--start", type=int, default=30, help="steps before the profiled window (warm-up, compile)")
    parser.add_argument("--steps", type=int, default=5, help="steps profiled")
    args = parser.parse_args(argv)
    root = ROOT / "bench_out" / "step_profile" / f"{args.task}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"
    cfg = compose_config(root, f"model={args.task}", "logger=csv", *args.overrides,
                         *training_only(args.start + args.steps + 1), output_dir=root)
    root.mkdir(parents=True, exist_ok=True)
    run(cfg, extra_callbacks=[StepProfile(args.start, args.steps, root / "step_profile.txt")])


if __name__ == "__main__":
    main()
