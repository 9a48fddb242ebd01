"""Training settings do what they say: gradient clipping by value, channels_last weights."""
from __future__ import annotations

import functools

import lightning as L
import torch

from suite.train import run
from tests.tiny_task import TinyModule


def test_gradient_clipping_by_value_is_applied():
    model = TinyModule(optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    trainer = L.Trainer(gradient_clip_val=1e-4, gradient_clip_algorithm="value", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    seen = []

    class Grab(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after clip and step
            seen.append(max(p.grad.abs().max().item() for p in pl_module.parameters()))

    trainer.callbacks.append(Grab())
    from tests.tiny_task import TinyDataModule

    trainer.fit(model, datamodule=TinyDataModule({"batch_size": 8}))
    assert seen and seen[0] <= 1e-4 + 1e-12


def test_channels_last_applies_to_convolution_weights(make_config, monkeypatch):
    from suite import train

    seen = {}

    def spy(cfg, trainer, model, datamodule, resume_ckpt, logged):
        seen["model"] = model

    monkeypatch.setattr(train, "_dispatch", spy)
    run(make_config("model=tiny", "channels_last=true", "+model.conv=true"))
    conv = seen["model"].conv
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
