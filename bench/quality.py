"""Time to quality: each task's real-data experiment trained for fixed wall-clock budgets, then
tested, through `suite.train.run` exactly as `python run.py` runs it.

    python -m bench.quality --data-root ../shared/data                 # every task, every budget
    python -m bench.quality --tasks nerf --budgets 2,5                  # one task, chosen budgets (minutes)

A task declares its profiles in `lightning_modules/<task>/benchmark.py` as `QUALITY`: a list of
{"name", "overrides" ("{data}" stands for --data-root), "metrics", "budgets" (minutes)}. Each
budget is a separate run from scratch with `trainer.max_time`, so a 2-minute number is what a
user gets from a 2-minute run (its schedule included), not a snapshot of a longer one.
Results: JSON and a Markdown table under bench_out/quality-<timestamp>/.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import time
from pathlib import Path

from bench import rows as bench_rows
from bench.harness import COMPOSE_ROOT, _device_name, tasks
from bench.report import failure
from suite.compose import ROOT, compose_config
from suite.config_checks import ConfigError
from suite.train import run

log = logging.getLogger("bench.quality")


def profiles(task: str) -> list[dict]:
    try:
        return list(getattr(importlib.import_module(f"lightning_modules.{task}.benchmark"), "QUALITY", []))
    except ImportError:
        return []


def max_time(minutes: float) -> str:
    seconds = round(minutes * 60)
    return f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def profile_overrides(profile: dict, data_root: Path, extra: list[str]) -> list[str]:
    """The profile's overrides and those of the user's -o for its task that its configuration reads (profiles of
    one task may differ in what they read: nerf's renderers); main refuses an -o that no profile reads."""
    overrides = [o.replace("{data}", str(data_root)) for o in profile["overrides"]]
    return bench_rows.applicable([*overrides, *extra], extra, COMPOSE_ROOT)


def measure(out: Path, profile: dict, minutes: float, overrides: list[str]) -> dict:
    """One run of `profile` from scratch with `overrides` (profile_overrides) for `minutes`, then its test metrics."""
    run_dir = out / f"{profile['name']}-{minutes:g}min"
    cfg = compose_config(run_dir, *overrides, f"++trainer.max_time={max_time(minutes)}", "logger=csv",
                         f"paths.data_dir={out / 'data'}",  # generated scenes are made once for all budgets
                         "print_config=false", "run_name=run", output_dir=run_dir,
                         search_path=bench_rows.SEARCH_PATH)
    start = time.perf_counter()
    run(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "result.json").read_text())["metrics"]
    return {"wall_s": time.perf_counter() - start, **{m: metrics.get(m) for m in profile["metrics"]}}


def table(rows: list[dict]) -> str:
    lines = ["| task | profile | budget | wall s | metrics |", "| --- | --- | ---: | ---: | --- |"]
    for r in rows:
        shown = r.get("error") or ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items() if v is not None)
        lines.append(f"| {r['task']} | {r['profile']} | {r['budget_min']:g} min | {r.get('wall_s', 0):.0f} | {shown} |")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], data_root: str) -> str:
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": _device_name(), "data_root": data_root}
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = f"{meta['date']} on {meta['device']}\n\n{table(rows)}\n"
    (out / "quality.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(tasks()))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budgets", default=None, help="minutes, comma-separated (default: each profile's)")
    parser.add_argument("--profiles", default=None, help="only these profile names, comma-separated")
    parser.add_argument("-o", "--override", action="append", default=[], help="TASK:KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out or ROOT / "bench_out" / f"quality-{dt.datetime.now():%Y-%m-%d_%H-%M-%S}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        extra = [o.split(":", 1)[1] for o in args.override if o.startswith(f"{task}:")]
        chosen = [p for p in profiles(task) if not args.profiles or p["name"] in args.profiles.split(",")]
        overrides = {p["name"]: profile_overrides(p, Path(args.data_root).resolve(), extra) for p in chosen}
        unread = [o for o in extra if not any(o in read for read in overrides.values())]
        if unread:
            raise ConfigError(f"{task}: no profile asked for reads {', '.join(unread)} (-o); each one's configuration "
                              "would ignore it")
        for profile in chosen:
            budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else profile["budgets"]
            for minutes in budgets:
                row = {"task": task, "profile": profile["name"], "budget_min": minutes}
                log.info("== %s / %s: %g min", task, profile["name"], minutes)
                try:
                    result = measure(out, profile, minutes, overrides[profile["name"]])
                    row.update(wall_s=result.pop("wall_s"), metrics=result)
                except Exception as err:  # one task's failure must not hide the others' numbers
                    log.exception("%s / %s failed", task, profile["name"])
                    row.update(failure(err))
                rows.append(row)
                write_results(out, rows, args.data_root)  # after each run: a pass cut short keeps its numbers
    md = write_results(out, rows, args.data_root)
    print(md)
    print(f"written to {out}")
    return rows


if __name__ == "__main__":
    main()
