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


def _accumulated_fit(graphs: bool) -> tuple[TinyModule, list[set[int]]]:
    """Four optimizer steps of two micro-batches each; `graphs`: the module compiled with CUDA graphs (as on a
    GPU), which only its gradient buffers see here. Records where each step's .grad tensors live."""
    from common.fast_path import CUDA_GRAPHS, CompileDecision
    from tests.tiny_task import TinyDataModule

    torch.manual_seed(0)
    model = TinyModule(optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    if graphs:
        model._compile_decision = CompileDecision(True, "CUDA graphs, as a GPU decides them", CUDA_GRAPHS)
    buffers: list[set[int]] = []

    class Where(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            buffers.append({p.grad.data_ptr() for p in pl_module.parameters()})

    trainer = L.Trainer(accumulate_grad_batches=2, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Where()])
    trainer.fit(model, datamodule=TinyDataModule({"batch_size": 8}))
    return model, buffers


def test_accumulated_gradients_under_cuda_graphs_live_in_buffers_of_their_own_and_train_alike():
    """A CUDA graph replay writes its gradient outputs where the last replay did: a .grad that is one of them is
    overwritten by the next micro-batch. So there the module keeps its own .grad buffers, zeroed in place."""
    plain, plain_buffers = _accumulated_fit(graphs=False)
    graphed, graphed_buffers = _accumulated_fit(graphs=True)
    assert len(graphed_buffers) == 4 and all(b == graphed_buffers[0] for b in graphed_buffers)
    assert graphed.accumulates_into_graph_outputs() and not plain.accumulates_into_graph_outputs()
    for a, b in zip(plain.parameters(), graphed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)  # the same training: zeroing in place, not to None, changes nothing
