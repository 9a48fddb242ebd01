"""legal_bert's encoder split into 2 pipeline stages on 2 CPU processes (gloo) trains like the whole
model on one: the same loss at every step, and a checkpoint that loads into the plain module."""
from __future__ import annotations

import csv

import pytest
import torch

from lightning_modules.legal_bert import LegalBertClassifier

# No dropout and fp32, so the only difference left is summation order inside micro-batches.
COMMON = ("experiment=legal_bert_pipeline", "data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8",
          "model.num_microbatches=2", "model.dropout=0", "model.encoder_dropout=0", "max_epochs=2",
          "device=cpu", "logger=csv", "num_workers=0", "deterministic=true", "trainer.log_every_n_steps=1",
          "model.plot_every_n_epochs=0")


def _losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


@pytest.mark.slow  # two processes and a single-device run: about 22 s on 2 cores
def test_two_stage_pipeline_matches_one_device(cli, tmp_path, tiny_bert_dir):
    model = f"model.pretrained_path={tiny_bert_dir}"
    one = cli(*COMMON, model, "trainer.devices=1", "run_name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*COMMON, model, "trainer.devices=2", "run_name=two")
    assert two.returncode == 0, two.stderr[-3000:]
    logs = tmp_path / "logs" / "legal_bert"
    assert "Pipeline stage 1 of 2: encoder layers 1-1, pooler and head" in (logs / "two" / "run.log").read_text()
    a, b = _losses(logs / "one"), _losses(logs / "two")
    assert len(a) >= 6 and a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])

    state = torch.load(logs / "two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    single = torch.load(logs / "one" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"].keys() == single["state_dict"].keys()  # every stage's weights, merged
    plain = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), label_names=state["hyper_parameters"]["label_names"],
                                multi_label=True)
    plain.load_state_dict(state["state_dict"], strict=True)
    for name, value in single["state_dict"].items():
        assert torch.allclose(value.float(), state["state_dict"][name].float(), atol=1e-4), name


@pytest.mark.slow  # two DDP processes on the CPU
def test_ddp_trains_with_mean_pooling_whose_bert_pooler_is_unused(cli, tmp_path, tiny_bert_dir):
    """The bundled MiniLM pools by mean, leaving BERT's pooler unused: DDP stopped on it ("parameters
    that were not used in producing the loss"). The pooler is frozen now, and DDP trains."""
    model = LegalBertClassifier(pretrained_path=str(tiny_bert_dir), pooling="mean")
    assert not any(p.requires_grad for p in model.encoder.pooler.parameters())
    ddp = cli("model=legal_bert", f"model.pretrained_path={tiny_bert_dir}", "model.pooling=mean", "trainer=ddp",
              "trainer.devices=2", "device=cpu", "logger=csv", "num_workers=0", "debug=fast_dev_run",
              "data.max_sequence_length=32", "data.synthetic_docs=8", "batch_size=8", "run_name=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
