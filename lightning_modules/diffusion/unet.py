"""The diffusion module's network: a diffusers UNet2DModel built from the model.net settings."""
from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DModel

TIME_SCALE_SHIFTS = ("default", "scale_shift")


def build_unet(image_size: int = 32, channels: int = 1, num_classes: int = 10,
               block_out_channels: Sequence[int] = (64, 128, 128), layers_per_block: int = 2,
               attention_resolutions: Sequence[int] = (8,), dropout: float = 0.1, norm_num_groups: int = 32,
               attention_head_dim: int | None = 8, time_scale_shift: str = "default") -> UNet2DModel:
    """One down/up block per entry of block_out_channels; attention where the feature map is
    `attention_resolutions` pixels wide (level i works at image_size / 2**i). The time (+ class)
    embedding enters each ResNet block as a bias (`default`) or as a FiLM scale and shift after
    the normalisation (`scale_shift`, as ADM conditions on classes)."""
    if time_scale_shift not in TIME_SCALE_SHIFTS:
        raise ValueError(f"model.net.time_scale_shift={time_scale_shift!r}; choose one of {', '.join(TIME_SCALE_SHIFTS)}")
    widths = list(block_out_channels)
    bad = [c for c in widths if c % norm_num_groups]
    if bad:
        raise ValueError(f"model.net.norm_num_groups={norm_num_groups} must divide every block_out_channels entry {widths}")
    resolutions = [image_size // 2 ** i for i in range(len(widths))]
    attn = [r in set(attention_resolutions) for r in resolutions]
    unknown = sorted(set(attention_resolutions) - set(resolutions))
    if unknown:
        raise ValueError(f"model.net.attention_resolutions={list(attention_resolutions)}: {unknown} is not one of the "
                         f"U-Net's feature-map sizes {resolutions}")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels, block_out_channels=tuple(widths),
        layers_per_block=layers_per_block, down_block_types=down, up_block_types=up, dropout=dropout,
        norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim,
        resnet_time_scale_shift=time_scale_shift,
        num_class_embeds=num_classes + 1 if num_classes else None,  # the extra row is the null class
    )
