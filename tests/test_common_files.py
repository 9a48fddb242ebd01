import os

import pytest

from common.files import atomic_write, remove_stale_temporaries


def test_atomic_write_replaces_only_when_the_write_completes(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fail(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead_file, dead_dir = tmp_path / "a.tmp-999999999", tmp_path / "b.tmp-999999999"
    live = tmp_path / f"c.tmp-{os.getpid()}"
    dead_file.write_text("x")
    dead_dir.mkdir()
    live.write_text("x")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
