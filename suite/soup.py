"""Model soups: the average of several fine-tunes' weights, as one checkpoint.

Fine-tunes of one pretrained model that differ only in their seed tend to land in one basin, and the
average of their weights (a "uniform soup", Wortsman et al. 2022) often predicts better than a typical
member, at the cost of one model. On UNFAIR-ToS, MiniLM fine-tunes scored macro-F1 0.783-0.815 alone
and 0.788-0.806 as soups of four, from 0.4 points below to 1.3 above their members' mean (BENCHMARKS.md;
the task's ensembles, which average predictions instead, did better).

    python run.py -m experiment=unfair_tos seed=1,2,3,4 ...    # soup: true -> <sweep dir>/soup.ckpt, tested
    python -m suite.soup out.ckpt 'logs/legal_bert/multirun_x/*/checkpoints/last.ckpt'
    python run.py mode=test ckpt_path=out.ckpt                 # or mode=predict
    python -m suite.soup --ensemble ens.ckpt '...'             # keep all members, average their predictions

With `soup: true`, a `-m` sweep over seeds averages its jobs' checkpoints (each job's best one, else its
last.ckpt) into <sweep dir>/soup.ckpt and tests it in a fresh process; where the task has an ensemble
(legal_bert), it also writes and tests ensemble.ckpt. soup.json beside them holds every member's and
the combinations' test metrics. Jobs that failed (ignore_failures=true) are left out, and fewer
than 2 finished jobs end the sweep non-zero. A sweep that also varies anything but the seed is refused
before it starts: averaging models trained differently is a choice to make by hand, with the command above.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig

from common.files import atomic_write
from suite.checkpoint import check_checkpoint

log = logging.getLogger(__name__)

# Checkpoint entries of one training run's progress, left out of a soup: a soup is for evaluating and
# predicting, not for resuming. Everything else (hyperparameters, run config, datamodule state) comes
# from the first member.
DROPPED = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def member_paths(patterns: list[str]) -> list[Path]:
    """Checkpoint files from paths and glob patterns, in order; a pattern matching nothing is an error."""
    paths = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise FileNotFoundError(f"No checkpoint matches {pattern}")
        paths += [Path(p) for p in matched]
    return paths


def load_members(paths: list[Path], kind: str) -> list[dict[str, Any]]:
    """The checkpoints (memory-mapped), after checking that they can be combined: at least 2, holding
    the same tensors with the same shapes and predicting the same labels."""
    if len(paths) < 2:
        raise ValueError(f"A {kind} needs at least 2 checkpoints; got {[str(p) for p in paths]}")
    checkpoints = [check_checkpoint(p) for p in paths]
    for path, member in zip(paths[1:], checkpoints[1:], strict=True):
        _check_compatible(paths[0], checkpoints[0], path, member)
    return checkpoints


def _check_compatible(first_path: Path, first: dict, path: Path, member: dict) -> None:
    a, b = first["state_dict"], member["state_dict"]
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"{path} holds other weights than {first_path}: missing {missing[:5]}, extra {extra[:5]}")
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        k = shapes[0]
        raise ValueError(f"{path}: {k} has shape {tuple(b[k].shape)}, {first_path} has {tuple(a[k].shape)}")
    labels = [c.get("hyper_parameters", {}).get("label_names") for c in (first, member)]
    if labels[0] != labels[1]:
        raise ValueError(f"{path} predicts labels {labels[1]}, {first_path} predicts {labels[0]}: "
                         "their heads' rows mean different things and cannot be averaged")


def _kept(first: dict[str, Any]) -> dict[str, Any]:
    """The first member's entries that a combined checkpoint carries (all but the run's progress and weights)."""
    return {k: v for k, v in first.items() if k not in DROPPED and k != "state_dict"}


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """One checkpoint whose floating-point weights are the members' mean; other tensors (step counters,
    integer buffers) are taken from the first member."""
    checkpoints = load_members(paths, "soup")
    reference = checkpoints[0]["state_dict"]
    state = {}
    for key, value in reference.items():
        if value.is_floating_point():
            mean = sum(c["state_dict"][key].double() for c in checkpoints) / len(checkpoints)
            state[key] = mean.to(value.dtype)
        else:
            state[key] = value.clone()
    return {**_kept(checkpoints[0]), "state_dict": state, "soup_members": [str(p) for p in paths]}


def ensemble_checkpoint(paths: list[Path]) -> dict[str, Any]:
    """One checkpoint holding every member, for the task's ensemble module (the members' class names it
    as `ensemble_target`), which averages their predictions."""
    checkpoints = load_members(paths, "ensemble")
    first = checkpoints[0]
    config = first.get("run_config")
    if not config:
        raise ValueError(f"{paths[0]} carries no run config, so its task (and its ensemble) is unknown")
    target = config["model"]["_target_"]
    ensemble = getattr(get_class(target), "ensemble_target", None)
    if not ensemble or ensemble == target:
        raise ValueError(f"{paths[0]}: {target} has no ensemble; average the weights instead (python -m suite.soup)")
    hparams = dict(first.get("hyper_parameters") or {})
    model = {**config["model"], "_target_": ensemble, "member": hparams, "num_members": len(paths)}
    state = {f"members.{i}.{k}": v for i, c in enumerate(checkpoints) for k, v in c["state_dict"].items()}
    return {**_kept(first), "state_dict": state, "hyper_parameters": {"member": hparams, "num_members": len(paths)},
            "run_config": {**config, "model": model}, "ensemble_members": [str(p) for p in paths]}


def write_soup(patterns: list[str], out: Path, ensemble: bool = False) -> Path:
    """Average the checkpoints' weights (or, with ensemble=True, keep them all as an ensemble) into `out`."""
    paths = member_paths(patterns)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; nothing was overwritten. Choose another path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = ensemble_checkpoint(paths) if ensemble else average_checkpoints(paths)
    atomic_write(out, lambda tmp: torch.save(checkpoint, tmp))
    log.info("%s of %d checkpoints written to %s", "Ensemble" if ensemble else "Soup", len(paths), out)
    return out


# ---- at the end of a seed sweep -----------------------------------------------------------------
class SoupAtSweepEnd(Callback):
    """Hydra callback (conf/hydra/default.yaml): with `soup: true`, soup a finished seed sweep and test it,
    and likewise its ensemble where the task has one. A sweep that cannot be souped (it varies more than
    the seed, fewer than 2 of its jobs finished, or a soup failed its test) exits non-zero saying why:
    Hydra turns a callback's exceptions into warnings, so this one exits itself."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = _swept_keys(config) if config.get("soup") else set()
        if swept - {"seed"}:  # refused before any job trains
            _exit(f"soup=true averages a sweep over seeds only, and this one varies {sorted(swept)}, not only the "
                  "seed. Sweep the seed alone, or soup chosen checkpoints by hand: python -m suite.soup OUT CKPT...")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("soup"):
            return
        try:
            self._soup(config)
        except Exception as err:
            _exit(f"soup=true: {type(err).__name__}: {err}")

    def _soup(self, config: DictConfig) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = sorted((d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
        found = {d.name: _tested_checkpoint(d) for d in jobs}
        members = [p for p in found.values() if p]
        left_out = ", ".join(f"job {n} ({_why_not(sweep / n)})" for n, p in found.items() if not p)
        if len(members) < 2:
            _exit(f"soup=true: {len(members)} of {len(jobs)} jobs finished with a checkpoint under {sweep}; a soup "
                  f"needs 2, so none was made. Not finished: {left_out or 'none'}")
        if left_out:
            print(f"soup=true: souping the {len(members)} jobs that finished; left out: {left_out}", flush=True)
        report = {"members": {str(p): _result(p.parent.parent) for p in members}}
        kinds = ["soup"] + (["ensemble"] if getattr(get_class(config.model._target_), "ensemble_target", None) else [])
        for kind in kinds:
            combined = write_soup([str(p) for p in members], sweep / f"{kind}.ckpt", ensemble=kind == "ensemble")
            report[kind] = _test(config, combined, sweep / f"{kind}_test")
        (sweep / "soup.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"{' and '.join(kinds).capitalize()} of {len(members)} runs in {sweep}; metrics: {sweep / 'soup.json'}")


def _exit(message: str) -> None:
    sys.exit(message)  # printed to stderr, exit status 1


def _why_not(job_dir: Path) -> str:
    error = job_dir / "error.log"
    return f"failed: {error}" if error.is_file() else "no result.json or checkpoint"


def _test(config: DictConfig, checkpoint: Path, test_dir: Path) -> dict[str, float]:
    """Test a checkpoint in a fresh process, as `python run.py mode=test ckpt_path=...` would."""
    command = [sys.executable, sys.argv[0], *_fixed_overrides(config), "mode=test", f"ckpt_path={checkpoint}",
               "resume=false", f"hydra.run.dir={test_dir}"]
    log.info("Testing %s: %s", checkpoint.name, " ".join(command))
    if subprocess.run(command, cwd=os.getcwd()).returncode != 0:
        raise RuntimeError(f"Testing {checkpoint} failed; see {test_dir / 'run.log'}")
    return _result(test_dir)


def _task_overrides(config: DictConfig) -> list[tuple[str, Any]]:
    """(text, parsed override) for each override on the sweep's command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(config.hydra.overrides.task)
    return list(zip(task, OverridesParser.create().parse_overrides(task), strict=True))


def _swept_keys(config: DictConfig) -> set[str]:
    keys = {o.key_or_group for _, o in _task_overrides(config) if o.is_sweep_override()}
    return keys | set((config.hydra.sweeper.get("params") or {}).keys())


def _fixed_overrides(config: DictConfig) -> list[str]:
    """The sweep's command line without its swept values and run names, plus the Hydra settings a
    run needs (search path, environment)."""
    kept = [text for text, o in _task_overrides(config) if not o.is_sweep_override() and o.key_or_group != "run_name"]
    hydra = [o for o in config.hydra.overrides.hydra if o.split("=")[0] in ("hydra.searchpath", "hydra.job.env_set")]
    return kept + hydra


def _tested_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a finished fit tested: its best one if it kept one, else last.ckpt."""
    if not (run_dir / "result.json").is_file():
        return None  # failed or unfinished
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    return best[-1] if best else (last if last.is_file() else None)


def _result(run_dir: Path) -> dict[str, float]:
    path = run_dir / "result.json"
    metrics = json.loads(path.read_text()).get("metrics", {}) if path.is_file() else {}
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the soup checkpoint to write (never overwritten)")
    parser.add_argument("members", nargs="+", help="checkpoint files or glob patterns (quote them)")
    parser.add_argument("--ensemble", action="store_true",
                        help="keep every member and average their predictions instead of their weights "
                             "(tasks whose module names an ensemble_target: legal_bert)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_soup(args.members, args.out, ensemble=args.ensemble)
    print(f"Test it: python run.py mode=test ckpt_path={out}")


if __name__ == "__main__":
    main()
