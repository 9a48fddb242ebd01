"""A folder the user names is only read: every task's fit, test and predict, twice with different
settings, leave it byte-identical; built-in data go to the suite's own cache; a missing or empty
folder is an error naming it and the formats looked for."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from datamodules.builtin import MARKER, builtin_folder, user_folder
from suite.train import run
from tests.clinical.test_run import SMALL as CLINICAL_SMALL
from tests.conftest import compose_config
from tests.diffusion.conftest import TINY_OVERRIDES as DIFFUSION_TINY
from tests.legal_bert.conftest import minilm_dir, tiny_bert_dir  # noqa: F401  (fixtures for the legal_bert case)
from tests.license_plate.helpers import SMALL as PLATES_SMALL
from tests.nerf.fixtures import write_blender
from tests.nerf.test_train import TINY_CLI as NERF_TINY


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder`: its size and hash (folders as -1), so any write, rename or addition shows."""
    return {str(p.relative_to(folder)): (-1, "") if p.is_dir() else (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


# ---- a user's own data, in each task's format ---------------------------------------------------
def nerf_scene(root: Path) -> Path:
    return write_blender(root / "lego", size=16, views=(4, 2, 2))


def plate_folder(root: Path) -> Path:
    from datamodules.license_plate.synthetic import generate

    return generate(root / "plates", {"train": 4, "val": 2, "test": 2}, (96, 128))


def clinical_records(root: Path) -> Path:
    from datamodules.clinical.simulate import simulate_cohort

    (root / "cgm").mkdir(parents=True)
    simulate_cohort(num_patients=4, days=2, seed=5).to_csv(root / "cgm" / "records.csv", index=False)
    return root / "cgm"


def image_folder(root: Path) -> Path:
    for c in range(3):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("L", (16, 16), color=40 * c + 5 * i).save(root / "images" / f"class{c}" / f"{i}.png")
    return root / "images"


def legal_text(root: Path) -> Path:
    folder = root / "clauses"
    folder.mkdir(parents=True)
    for split, n in (("train", 16), ("validation", 4), ("test", 4)):
        rows = [{"text": f"clause {i} of {split}: the provider may terminate", "labels": ["TER"] if i % 2 else ["LAW"],
                 "doc_id": f"{split}{i // 4}"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


ONE_BATCH = ["max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
# task, writer, tiny settings, two settings that differ
CASES = [
    ("nerf", nerf_scene, [*NERF_TINY], ["data.downscale=1.0", "data.downscale=2.0"]),
    ("license_plate", plate_folder, [*PLATES_SMALL, "data.split=[2,1,1]"], ["data.image_size=128", "data.image_size=96"]),
    ("clinical", clinical_records, [*CLINICAL_SMALL], ["data.split_seed=0", "data.split_seed=1"]),
    ("diffusion", image_folder, [*DIFFUSION_TINY, "model.num_classes=3", "batch_size=4"], ["data.val_size=3", "data.val_size=6"]),
    ("legal_bert", legal_text, ["data.max_sequence_length=32", "batch_size=4"], ["seed=1", "seed=2"]),
]


# license_plate's four detector runs are the slowest case on a CPU: `make test-all` runs it, `make test` the other four
SLOW_CASES = {"license_plate"}


@pytest.mark.parametrize(("task", "write", "tiny", "variants"),
                         [pytest.param(*c, marks=pytest.mark.slow) if c[0] in SLOW_CASES else c for c in CASES],
                         ids=[c[0] for c in CASES])
def test_fit_test_and_predict_leave_the_users_folder_byte_identical(tmp_path, task, write, tiny, variants, request):
    folder = write(tmp_path / "user")
    extra = []
    if task == "legal_bert":
        extra = [f"model.pretrained_path={request.getfixturevalue('tiny_bert_dir')}"]
    before = snapshot(tmp_path / "user")
    first, second = ([f"model={task}", f"data.data_dir={folder}", *tiny, *extra, v] for v in variants)
    run(compose_config(tmp_path / "fit", *first, *ONE_BATCH))                    # fit, then test the best
    ckpt = tmp_path / "fit" / "run" / "checkpoints" / "last.ckpt"
    for mode in ("test", "predict"):                                              # the README's evaluation
        run(compose_config(tmp_path / mode, f"mode={mode}", f"ckpt_path={ckpt}", f"data.data_dir={folder}"))
    run(compose_config(tmp_path / "again", *second, "debug=fast_dev_run"))       # other settings
    assert snapshot(tmp_path / "user") == before
    assert not list(tmp_path.rglob(MARKER)), "built-in data were generated although data_dir was set"


@pytest.mark.parametrize("task", [c[0] for c in CASES])
def test_a_missing_data_dir_is_an_error_naming_it_and_nothing_is_created(make_config, tmp_path, task):
    typo = tmp_path / "my_dataa"
    with pytest.raises(FileNotFoundError, match="my_dataa.*expected"):
        run(make_config(f"model={task}", f"data.data_dir={typo}", "debug=fast_dev_run"))
    assert not typo.exists() and not list(tmp_path.rglob(MARKER))


def test_a_data_dir_that_is_a_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
        user_folder(tmp_path / "notes.txt", "clauses")


def test_built_in_data_are_generated_once_whole_and_apart_from_anything_else(tmp_path):
    calls = []

    def generate(folder: Path) -> None:
        calls.append(folder)
        (folder / "a.txt").write_text("data")

    first = builtin_folder(tmp_path, "toy", {"size": 1}, generate)
    assert builtin_folder(tmp_path, "toy", {"size": 1}, generate) == first and len(calls) == 1
    other = builtin_folder(tmp_path, "toy", {"size": 2}, generate)
    assert other != first and (first / "a.txt").read_text() == "data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])   # no temporaries left


def test_a_half_generated_cache_is_never_used_and_a_foreign_folder_never_written(tmp_path):
    def fail(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        builtin_folder(tmp_path, "toy", {"size": 1}, fail)
    assert list(tmp_path.iterdir()) == []
    folder = builtin_folder(tmp_path, "toy", {"size": 1}, lambda f: (f / "ok.txt").write_text("y"))
    (folder / MARKER).unlink()   # someone else's folder of that name now: left alone
    (folder / "mine.txt").write_text("user")
    with pytest.raises(FileExistsError, match="left alone"):
        builtin_folder(tmp_path, "toy", {"size": 1}, lambda f: None)
    assert (folder / "mine.txt").read_text() == "user"


def test_a_killed_generation_leaves_a_temporary_that_the_next_start_removes(tmp_path):
    stale = tmp_path / "toy-0123456789ab.tmp-999999999"    # no such process
    stale.mkdir()
    (stale / "half.txt").write_text("x")
    builtin_folder(tmp_path, "toy", {"size": 1}, lambda f: (f / "ok.txt").write_text("y"))
    assert not stale.exists()


@pytest.mark.parametrize(("old", "builtin"), [
    ({"data_dir": "data/nerf", "generate_default": True, "scene_size": 16}, True),
    ({"data_dir": "/scenes/lego", "generate_default": False}, False),
    ({"data_dir": "data/license_plate", "synthetic": True}, True),
    ({"data_dir": "/plates", "synthetic": False, "format": "yolo"}, False),
    ({"data_dir": "data/diffusion", "format": "digits"}, True),
    ({"data_dir": "data/legal_bert", "format": "synthetic", "cache_dir": "data/cache/legal_bert"}, True),
    ({"data_dir": "data/clinical", "files": None, "simulate": {"num_patients": 3}}, True),
    ({"data_dir": "/cgm", "files": "a.csv", "simulate": {}}, False),
])
def test_a_checkpoints_data_config_from_before_the_cache_still_evaluates(old, builtin):
    from datamodules.builtin import upgrade_stored_data_config

    new = upgrade_stored_data_config(old, "/suite/data/task")
    assert "generate_default" not in new and "synthetic" not in new
    assert (new["data_dir"] is None) == builtin
    assert new.get("format") not in ("digits", "synthetic") and new["cache_dir"]
    if not builtin:
        assert new["data_dir"] == old["data_dir"]


def test_a_checkpoint_written_before_the_cache_is_evaluated_on_its_built_in_data(tmp_path):
    import torch

    run(compose_config(tmp_path / "fit", "model=nerf", *NERF_TINY, *ONE_BATCH))
    ckpt = tmp_path / "fit" / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    data = checkpoint["run_config"]["data"]
    data["generate_default"], data["data_dir"] = True, str(tmp_path / "old_cache")   # as stored before
    del data["cache_dir"]
    torch.save(checkpoint, ckpt)
    run(compose_config(tmp_path / "test", "mode=test", f"ckpt_path={ckpt}"))   # generate_default was refused
    assert not (tmp_path / "old_cache").exists()
    assert list((tmp_path / "test" / "data" / "nerf").glob(f"scene-*/{MARKER}"))
