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


def _accumulated_fit(graphs: bool, replays_overwrite: bool) -> TinyModule:
    """Four optimizer steps of two micro-batches each. `graphs`: the module compiled with CUDA graphs, as a GPU
    decides. `replays_overwrite`: each backward's gradients come out in the same memory every time, as a CUDA
    graph replay's outputs do, so a .grad that is one of them is overwritten by the next micro-batch."""
    from common.fast_path import CUDA_GRAPHS, CompileDecision
    from tests.tiny_task import TinyDataModule

    torch.manual_seed(0)
    model = TinyModule(optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    model.idle = torch.nn.Parameter(torch.ones(3, 3))  # in no step's loss: AdamW (which decays it) must skip it
    if graphs:
        model._compile_decision = CompileDecision(True, "CUDA graphs, as a GPU decides them", CUDA_GRAPHS)
    if replays_overwrite:
        for param in model.parameters():
            out = torch.empty_like(param)
            param.register_hook(lambda grad, out=out: out.copy_(grad).detach())  # a graph output: one memory, always
    trainer = L.Trainer(accumulate_grad_batches=2, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=TinyDataModule({"batch_size": 8}))
    return model


def test_accumulated_gradients_under_cuda_graphs_sum_every_micro_batch_as_eager_does():
    """A CUDA graph replay writes its gradients where the last replay did: kept as a .grad, one micro-batch's would be
    overwritten by the next one's. The module copies them out, so accumulation trains as it does eagerly."""
    eager = _accumulated_fit(graphs=False, replays_overwrite=False)
    graphed = _accumulated_fit(graphs=True, replays_overwrite=True)
    unguarded = _accumulated_fit(graphs=False, replays_overwrite=True)  # the same outputs without the copies
    assert graphed.accumulates_into_graph_outputs() and not eager.accumulates_into_graph_outputs()
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)
    assert not all(torch.allclose(a, c, atol=1e-6) for a, c in zip(eager.parameters(), unguarded.parameters(), strict=True))
    assert graphed.idle.grad is None and torch.equal(graphed.idle, torch.ones(3, 3))  # no zeroed buffer to decay
