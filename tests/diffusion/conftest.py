"""Tiny settings shared by the diffusion tests: a 16x16 U-Net with (16, 32) channels."""
import pytest

from lightning_modules.diffusion import DiffusionModule

TINY_MODEL = {"image_size": 16, "channels": 1, "num_classes": 3, "block_out_channels": (16, 32), "layers_per_block": 1,
                  "attention_resolutions": (8,), "dropout": 0.0, "norm_num_groups": 8, "attention_head_dim": 8,
                  "num_timesteps": 1000, "num_inference_steps": 4}

TINY_OVERRIDES = [
    "data.image_size=16", "model.net.block_out_channels=[16,32]", "model.net.layers_per_block=1",
    "model.net.attention_resolutions=[8]", "model.net.norm_num_groups=8", "model.num_inference_steps=3",
    "model.grid_per_class=2", "callbacks.sample_quality.classifier_steps=5",
    "callbacks.sample_quality.classifier_width=8", "callbacks.sample_quality.max_samples=20", "batch_size=16",
]


@pytest.fixture
def tiny_module():
    def make(**kw):
        return DiffusionModule(**{**TINY_MODEL, **kw})
    return make
