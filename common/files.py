"""Writing files so that a process killed part way never leaves a half-written one in place.

`atomic_write(path, write_fn)` has `write_fn` write `<name>.tmp-<pid>` beside `path`, then renames it
over `path` (a file, or a folder that does not exist yet); on failure the temporary is removed. A
process killed while writing leaves its temporary behind: `remove_stale_temporaries(folder)` deletes
those whose process is gone, and leaves alone the ones still being written.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TMP_INFIX = ".tmp-"


def temporary_path(path: str | Path) -> Path:
    """Where this process writes `path` before renaming it into place: `<name>.tmp-<pid>` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_INFIX}{os.getpid()}")


def atomic_write(path: str | Path, write_fn: Callable[[Path], T]) -> T:
    """Call `write_fn(tmp)` to write the temporary beside `path`, then `os.replace` it onto `path`.
    The temporary is removed whether or not it succeeded; errors (from writing or renaming) propagate.
    Returns what `write_fn` returned."""
    path = Path(path)
    tmp = temporary_path(path)
    _remove(tmp)  # left by an earlier process that had this pid
    try:
        result = write_fn(tmp)
        os.replace(tmp, path)
        return result
    finally:
        _remove(tmp)


def remove_stale_temporaries(folder: str | Path) -> None:
    """Delete the `*.tmp-<pid>` files and folders in `folder` whose writing process is gone (killed
    while writing); those of live processes are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(f"*{TMP_INFIX}*"):
        pid = path.name.rsplit(TMP_INFIX, 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            _remove(path)


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
