"""The benchmark's tables: every row measured, the ratios between rows, and issue 27's targets, each
PASS or FAIL with its measured number (results.md, results.json, and the terminal)."""
from __future__ import annotations

import datetime as dt
import json
import platform
import statistics
from pathlib import Path

import torch

DASH = "—"

# Issue 27's targets: (task, what, row key, value key, threshold, at least?)
TARGETS = [
    ("nerf", "suite default / plain eager", "suite", "ratio", 1.5, True),
    ("clinical", "suite default / plain eager", "suite", "ratio", 1.3, True),
    ("clinical", "data wait (batch fetch and transfer), share of the suite's step", "suite", "fetch_share", 0.05, False),
    ("legal_bert", "suite default / plain eager", "suite", "ratio", 1.3, True),
    ("legal_bert", "suite default / HF Trainer", "suite", "ratio_peer", 1.5, True),
    ("diffusion", "suite default / plain eager", "suite", "ratio", 2.5, True),
    ("diffusion", "suite default / diffusers example loop", "suite", "ratio_peer", 2.0, True),
    ("license_plate", "suite default / plain eager", "suite", "ratio", 1.0, True),
    ("bert_base", "MFU of the fast path (BERT-base, 512 x 32, bf16)", "suite", "mfu", 0.45, True),
]
EAGER_FLOOR = 0.97  # suite eager / plain eager, every task


def failure(err: BaseException) -> dict:
    """A row's record of what stopped it, short enough for a table cell."""
    return {"error": f"{type(err).__name__}: {err}"[:300]}


def _fmt(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else ""


def table(rows: list[dict]) -> str:
    head = ("| task | impl | throughput | median step ms | spread ms | first step s | peak GB | MFU | data wait "
            "| between steps | host CPU ms | vs plain eager | vs peer |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        if r.get("note") and not r.get("items_per_sec"):  # a row that was not measured, e.g. no peer
            lines.append(f"| {r['task']} | {r['impl']} | {DASH} | | | | | | | | | | {r['note']} |")
            continue
        lines.append(f"| {r['task']} | {r['impl']} | {_fmt(r, 'items_per_sec', '{:,.0f}')} {r.get('unit', '')}/s | "
                     f"{_fmt(r, 'median_step_ms', '{:.2f}')} | {_fmt(r, 'spread_ms', '{:.2f}')} | "
                     f"{_fmt(r, 'first_step_s', '{:.1f}')} | {_fmt(r, 'peak_mem_gb', '{:.2f}')} | "
                     f"{_fmt(r, 'mfu', '{:.1%}')} | {_fmt(r, 'fetch_share', '{:.1%}')} | {_fmt(r, 'wait_share', '{:.1%}')} | "
                     f"{_fmt(r, 'host_cpu_ms', '{:.2f}')} | {_fmt(r, 'ratio', '{:.3f}')} | "
                     f"{_fmt(r, 'ratio_peer', '{:.3f}')} |")
    return "\n".join(lines + [""] + row_notes(rows))


def _spread(values: list[float] | None) -> str:
    if not values or len(values) < 2:
        return ""
    return f" (by round {min(values):.3f}-{max(values):.3f}, median {statistics.median(values):.3f})"


def row_notes(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("ratio") is not None and r.get("key") != "plain":
            out.append(f"- {r['task']}: {r['impl']} / plain eager = {r['ratio']:.3f}{_spread(r.get('ratio_by_round'))}")
        if r.get("ratio_peer") is not None:
            out.append(f"- {r['task']}: suite default / peer = {r['ratio_peer']:.3f}"
                       f"{_spread(r.get('ratio_peer_by_round'))}")
        if r.get("hook_ms"):
            out.append(f"- {r['task']} / {r['impl']}: {hook_note(r['hook_ms'], r.get('median_step_ms'))}")
        if r.get("saved_ms") is not None:
            out.append(f"- {r['task']}: {r['impl'].removeprefix('suite without ')} costs {r['saved_ms']:.2f} ms a step "
                       f"(the suite's spread across windows: {r.get('noise_ms') or 0:.2f} ms)")
        if r.get("skipped"):
            out.append(f"- {r['task']} / {r['impl']}: {r['skipped']}")
    errors = [f"- {r['task']} / {r['impl']}: {r['error']}" for r in rows if r.get("error")]
    return out + (["", "Failed:"] + errors if errors else [])


def hook_note(hook_ms: dict[str, float], step_ms: float | None, shown: int = 6) -> str:
    """The per-step hooks' host time by owner, largest first: where a host-bound step's extra time goes."""
    listed = ", ".join(f"{owner} {ms:.2f}" for owner, ms in list(hook_ms.items())[:shown])
    more = f" and {len(hook_ms) - shown} more" if len(hook_ms) > shown else ""
    of = f" of a {step_ms:.2f} ms step" if step_ms else ""
    return f"per-step hooks' host ms a step: {listed}{more} (all {sum(hook_ms.values()):.2f}{of})"


def _find(rows: list[dict], task: str, key: str) -> dict:
    return next((r for r in rows if r.get("task_key", r["task"]) == task and r.get("key") == key), {})


def targets(rows: list[dict]) -> str:
    """Issue 27's targets against this run's rows: PASS, FAIL, or not measured."""
    lines = ["| task | target | measured | result |", "| --- | --- | ---: | --- |"]
    checks = list(TARGETS)
    seen = sorted({r.get("task_key", r["task"]) for r in rows} - {"bert_base"})
    checks += [(task, "suite eager / plain eager", "suite_eager", "ratio", EAGER_FLOOR, True) for task in seen]
    for task, what, key, value_key, threshold, at_least in checks:
        value = _find(rows, task, key).get(value_key)
        goal = f"{'>=' if at_least else '<'} {_number(value_key, threshold)}"
        if value is None:
            if any(r.get("task_key", r["task"]) == task for r in rows):
                lines.append(f"| {task} | {what} {goal} | not measured | {DASH} |")
            continue
        ok = value >= threshold if at_least else value < threshold
        lines.append(f"| {task} | {what} {goal} | {_number(value_key, value)} | {'PASS' if ok else 'FAIL'} |")
    return "\n".join(lines)


def _number(key: str, value: float) -> str:
    return f"{value:.1%}" if key in ("mfu", "wait_share", "fetch_share") else f"{value:.3f}"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"


def write_results(out: Path, rows: list[dict], warmup: int, steps: int, windows: int, rounds: int = 1,
                  notes: list[str] | None = None) -> str:
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "device": device_name(), "torch": torch.__version__,
            "host": platform.node(), "warmup": warmup, "steps": steps, "windows": windows, "rounds": rounds,
            "notes": list(notes or [])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    remarks = "".join(f"- {note}\n" for note in meta["notes"])
    md = (f"{meta['date']} on {meta['device']} (torch {meta['torch']}); warm-up {warmup}, {windows} windows x {steps} steps"
          f"{f', {rounds} alternating rounds' if rounds > 1 else ''}\n\n{table(rows)}\n{remarks}\n"
          f"Issue 27's targets:\n\n{targets(rows)}\n")
    (out / "results.md").write_text(md)
    return md


def summarize(folders: list[str]) -> str:
    """One table and one target check from several runs' results.json (a GPU pass split over calls)."""
    rows, metas = [], []
    for folder in folders:
        data = json.loads((Path(folder) / "results.json").read_text())
        rows += data["rows"]
        metas.append(data["meta"])
    head = "; ".join(f"{m['date']} on {m['device']} (warm-up {m['warmup']}, {m['windows']} x {m['steps']} steps, "
                     f"{m['rounds']} rounds)" for m in metas)
    remarks = "".join(f"- {note}\n" for m in metas for note in m.get("notes", []))
    return f"{head}\n\n{table(rows)}\n{remarks}\nIssue 27's targets:\n\n{targets(rows)}\n"
