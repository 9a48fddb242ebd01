"""When a run fails: error.log in the run dir with how to resume, and a clear error on every rank
when another rank of a distributed job has died (instead of a hang or a bare backend message)."""
from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from common.lightning_private import before_the_launcher_kills
from suite import rundir

log = logging.getLogger("run")


class PeerRankFailed(RuntimeError):
    """Another rank of a distributed job died, and this one stopped instead of waiting for it."""


# What the collective backends say when the other end of a collective has gone away.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "NCCL error", "ncclRemoteError", "Socket Timeout", "DistNetworkError", "DistBackendError")


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_peer_failure(err: BaseException) -> bool:
    if world_size() < 2:
        return False
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in PEER_GONE)


def peer_failure_message(cfg: DictConfig, cause: BaseException | str) -> str:
    rank, world = rank_zero_only.rank, world_size()
    last = rundir.last_checkpoint(cfg)
    detail = f"Backend message: {str(cause).strip()[:300]}" if isinstance(cause, BaseException) else cause
    return (f"Rank {rank} of {world}: another rank of this job stopped (killed, crashed or out of memory) during a "
            f"collective operation, so this rank stops too instead of waiting for it. "
            f"{'The newest checkpoint is ' + str(last) if last.is_file() else 'No checkpoint was written yet'}; "
            f"the failing rank's own output says why it stopped. {detail}")


def log_before_the_launcher_kills(cfg: DictConfig) -> None:
    """Lightning's launcher watches the other ranks from rank 0 and, when one dies, SIGKILLs the
    whole job: under NCCL rank 0 could otherwise wait in a collective for ever. The kill leaves
    rank 0 no time for its own error, so the watcher writes it first (error.log, and the log)."""
    def report(failed: list[tuple[int, int]]) -> None:
        dead = ", ".join(f"rank {rank} exited with code {code}" for rank, code in failed)
        write_error_log(cfg, PeerRankFailed(peer_failure_message(cfg, f"Launcher: {dead}.")))

    before_the_launcher_kills(report)


def write_error_log(cfg: DictConfig, err: BaseException) -> None:
    try:
        out = Path(cfg.paths.output_dir)
    except Exception:
        return
    if isinstance(err, rundir.RunDirTaken):
        return  # that dir holds another run: the refusal goes to the console only
    rank = rank_zero_only.rank
    if (rank != 0 and not isinstance(err, PeerRankFailed)) or not out.exists():
        return  # a peer failure may leave rank 0 dead: every surviving rank writes its own log
    last = rundir.last_checkpoint(cfg)
    how = (f"Resume with: python run.py model={cfg.task_name} resume=true run_name={cfg.run_name}"
           if last.is_file() else "No checkpoint was written, so there is nothing to resume.")
    path = out / ("error.log" if rank == 0 else f"error-rank{rank}.log")
    path.write_text(f"{type(err).__name__}: {err}\n\n{how}\n\n" + "".join(traceback.format_exception(err)))
    log.error("Run failed: %s: %s. Traceback in %s. %s", type(err).__name__, err, path, how)
