"""legal_bert ensembles: checkpoints combined by `python -m suite.soup --ensemble`, used through run.py."""
from __future__ import annotations

import json

import pytest
import torch

from suite.soup import write_soup
from suite.train import run
from tests.conftest import compose_config

SMALL = ("data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8")


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_bert_dir):
    """Two briefly trained members that differ in seed and threshold."""
    root = tmp_path_factory.mktemp("members")
    paths = []
    for seed, threshold in ((1, 0.3), (2, 0.5)):
        cfg = compose_config(root / f"m{seed}", "model=legal_bert", "debug=fast_dev_run", f"seed={seed}",
                             f"model.pretrained_path={tiny_bert_dir}", f"model.thresholds={threshold}",
                             f"paths.data_dir={root / 'data'}", *SMALL)
        run(cfg)
        paths.append(root / f"m{seed}" / "run" / "checkpoints" / "last.ckpt")
    return paths


def _predict(tmp_path, name, ckpt, texts):
    cfg = compose_config(tmp_path / name, "model=legal_bert", "mode=predict", f"ckpt_path={ckpt}",
                         f"data.predict_file={texts}", "debug=default")
    run(cfg)
    found = next((tmp_path / name).rglob("predictions.jsonl"))
    return [json.loads(line) for line in found.read_text().splitlines()]


def test_ensemble_predicts_the_mean_of_its_members_probabilities(members, tmp_path):
    ensemble = write_soup([str(p) for p in members], tmp_path / "ensemble.ckpt", ensemble=True)
    texts = tmp_path / "clauses.txt"
    texts.write_text("In no event shall the Company be liable for lost profits.\nThis Agreement is governed by the "
                     "laws of Ireland.\nWe may terminate your account at any time.\n", encoding="utf-8")
    alone = [_predict(tmp_path, f"member{i}", ckpt, texts) for i, ckpt in enumerate(members)]
    together = _predict(tmp_path, "ensemble", ensemble, texts)
    assert alone[0] != alone[1], "the members differ, so the test can tell a mean from either one"
    for row, *rows in zip(together, *alone, strict=True):
        for label, p in row["probabilities"].items():
            assert p == pytest.approx(sum(r["probabilities"][label] for r in rows) / 2, abs=2e-6)
        # the members' thresholds were 0.3 and 0.5: the ensemble decides at their mean
        assert row["labels"] == [n for n, p in row["probabilities"].items() if p >= 0.4]


def test_ensemble_is_tested_like_any_checkpoint_and_cannot_be_trained(members, tmp_path):
    ensemble = write_soup([str(p) for p in members], tmp_path / "ensemble.ckpt", ensemble=True)
    state = torch.load(ensemble, weights_only=True)
    assert {k.split(".")[1] for k in state["state_dict"]} == {"0", "1"} and "optimizer_states" not in state
    cfg = compose_config(tmp_path / "test", "model=legal_bert", "mode=test", f"ckpt_path={ensemble}", "debug=default")
    run(cfg)
    result = json.loads(next((tmp_path / "test").rglob("result.json")).read_text())["metrics"]
    assert 0.0 <= result["test/micro_f1"] <= 1.0 and "test/macro_f1" in result

    from lightning_modules.legal_bert import LegalBertEnsemble

    model = LegalBertEnsemble(member=state["hyper_parameters"]["member"], num_members=2)
    with pytest.raises(RuntimeError, match="not trained: train its members"):
        model.training_step({}, 0)


def test_a_task_without_an_ensemble_is_told_to_soup_instead(make_config, tmp_path):
    paths = []
    for seed in (1, 2):
        cfg = compose_config(tmp_path / f"t{seed}", "model=tiny", "max_epochs=1", f"seed={seed}")
        run(cfg)
        paths.append(str(tmp_path / f"t{seed}" / "run" / "checkpoints" / "last.ckpt"))
    with pytest.raises(ValueError, match="has no ensemble; average the weights instead"):
        write_soup(paths, tmp_path / "e.ckpt", ensemble=True)
    assert not (tmp_path / "e.ckpt").exists()


@pytest.mark.slow  # about 24 s; the soup of a seed sweep is also covered by tests/test_soup.py
def test_seed_sweep_ends_with_a_tested_soup_and_ensemble(cli, tmp_path, tiny_bert_dir):
    result = cli("-m", "model=legal_bert", "debug=fast_dev_run", f"model.pretrained_path={tiny_bert_dir}", *SMALL,
                 "logger=csv", "seed=1,2", "soup=true", "run_name=s", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "logs" / "legal_bert" / "multirun_s"
    report = json.loads((sweep / "soup.json").read_text())
    assert len(report["members"]) == 2
    for kind in ("soup", "ensemble"):
        assert (sweep / f"{kind}.ckpt").is_file() and "test/macro_f1" in report[kind], kind
