"""torch.compile on the fast path: whether it runs, how, and what it costs.

`model.compile` is auto | true | false. A task's module says whether compiling pays for it
(`BaseTaskModule.compile_plan()`: a CompilePlan with a one-line reason), and `resolve_compile` turns
the setting, the device and that plan into one CompileDecision, printed once when the run starts:
- auto: off on CPU and MPS, off where the task's plan says compiling does not pay, on otherwise,
  with CUDA graphs (mode reduce-overhead) where the plan says every step has one shape;
- true: on wherever it runs, CPU included (the user asked); CUDA graphs only on a GPU;
- false: off.
`compiled` applies a decision, `use_compile_cache` keeps compiled kernels for the task's next run, and
`CompileCounter` counts the graphs compiled and the recompilations of a fit.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

# a module's `compile` argument: the annotation the suite's config check reads (suite/config_checks.py)
CompileSetting = bool | Literal["auto"]
CUDA_GRAPHS = "reduce-overhead"
CUDA_GRAPH_MODES = (CUDA_GRAPHS, "max-autotune")  # the torch.compile modes that replay CUDA graphs


@dataclass(frozen=True)
class CompilePlan:
    """A task's answer to "does torch.compile pay here, and how", on a GPU under model.compile=auto."""

    pays: bool
    reason: str                  # one line: shown in the start-up line either way
    mode: str | None = None      # "reduce-overhead" (CUDA graphs) where every step has one shape
    dynamic: bool | None = None  # torch.compile(dynamic=True) where sizes change from batch to batch


@dataclass(frozen=True)
class CompileDecision:
    on: bool
    reason: str
    mode: str | None = None
    dynamic: bool | None = None

    def line(self) -> str:
        """The start-up line: `compile: off (cpu)`, `compile: on, mode reduce-overhead (<why>)`."""
        return f"compile: on{f', mode {self.mode}' if self.mode else ''} ({self.reason})" if self.on \
            else f"compile: off ({self.reason})"

    def kwargs(self) -> dict[str, Any]:
        """torch.compile's arguments for this decision."""
        return {k: v for k, v in (("mode", self.mode), ("dynamic", self.dynamic)) if v is not None}


def compile_setting(value: Any) -> bool | str:
    """model.compile as True, False or "auto"; anything else is an error naming the key."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise ValueError(f"model.compile={value!r}: choose auto, true or false")


def resolve_compile(setting: Any, device_type: str, plan: CompilePlan | None,
                    refusal: str | None = None) -> CompileDecision:
    """The decision for this run. `device_type` is the torch device's type ("cuda", "cpu", "mps");
    `refusal` is a reason the run itself gives for staying eager under auto (mode=tune_batch_size)."""
    setting = compile_setting(setting)
    if plan is None:
        return CompileDecision(False, "this task has nothing to compile")
    if setting is False:
        return CompileDecision(False, "model.compile=false")
    cuda = device_type == "cuda"
    if setting == "auto":
        if not cuda:
            return CompileDecision(False, device_type)
        if refusal:
            return CompileDecision(False, refusal)
        if not plan.pays:
            return CompileDecision(False, plan.reason)
        return CompileDecision(True, plan.reason, plan.mode, plan.dynamic)
    mode = plan.mode if cuda or plan.mode != CUDA_GRAPHS else None  # CUDA graphs need a GPU
    reason = "model.compile=true" + ("" if mode == plan.mode else f"; no {plan.mode} (CUDA graphs) on {device_type}")
    return CompileDecision(True, reason, mode, plan.dynamic)


def compiled(fn: Callable, decision: CompileDecision) -> Callable:
    """torch.compile(fn) as decided. Under CUDA graphs each replay writes its outputs into the same
    memory, so they are copied out: what a step keeps (a loss, a forecast) keeps its own values."""
    function = torch.compile(fn, **decision.kwargs())
    if decision.mode not in CUDA_GRAPH_MODES:
        return function
    return lambda *args, **kwargs: _copied(function(*args, **kwargs))


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        items = [_copied(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, Mapping):  # a fresh container every call (a transformers ModelOutput): filled in place
        for key in list(value.keys()):
            value[key] = _copied(value[key])
    return value


def use_compile_cache(directory: str | os.PathLike) -> Path:
    """Keep inductor's compiled kernels, and its FX-graph and AOTAutograd caches, in `directory`, so the
    task's next run loads them instead of compiling again. Only called when compile is on."""
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    # the environment for compile worker processes; the configs for this one, whose were read at import
    os.environ.update({"TORCHINDUCTOR_CACHE_DIR": str(path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
                       "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"})
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process. torch (2.14) has no public counter for this: it is
    torch._dynamo.utils.counters["stats"]["unique_graphs"]; tests/test_fast_path.py fails if that moves."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Recompiles(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Recompiling function"):
            self.count += 1


class CompileCounter:
    """Graphs compiled and recompilations between `start()` and `stop()`. Recompilations are counted from
    torch's own recompile log (torch._logging.set_logs(recompiles=True), which also prints each one's
    reason); when TORCH_LOGS is set it is left as it is, and without `recompiles` in it they are not counted."""

    def __init__(self) -> None:
        self._handler = _Recompiles()
        self._graphs = 0
        self._set_logs = False
        self.counting_recompiles = False

    def start(self) -> CompileCounter:
        self._graphs = graphs_compiled()
        user = os.environ.get("TORCH_LOGS")
        self._set_logs = user is None
        self.counting_recompiles = user is None or "recompiles" in user
        if self._set_logs:
            torch._logging.set_logs(recompiles=True)
        logging.getLogger("torch._dynamo").addHandler(self._handler)
        return self

    def counts(self) -> tuple[int, int | None]:
        """(graphs compiled, recompilations or None when they cannot be counted) since start()."""
        return max(0, graphs_compiled() - self._graphs), self._handler.count if self.counting_recompiles else None

    def stop(self) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self._handler)
        if self._set_logs:
            torch._logging.set_logs()  # torch's defaults again
            self._set_logs = False
