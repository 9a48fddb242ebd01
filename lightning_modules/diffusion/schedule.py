"""The DDPM noise schedule and classifier-free guidance: what the diffusion module trains and samples under."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_noise_scheduler(num_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                         beta_end: float = 0.02, prediction_type: str = "epsilon") -> DDPMScheduler:
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"model.beta_schedule={beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type={prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    return DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule=BETA_SCHEDULES[beta_schedule],
                         beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type, clip_sample=True)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 is the conditional model."""
    return uncond + scale * (cond - uncond)


def check_guidance_interval(interval: Sequence[int] | None, num_timesteps: int,
                            key: str = "model.guidance_interval") -> list[int] | None:
    """[lo, hi] timesteps (inclusive) where guidance applies; None: every step. `key` names the setting in errors."""
    if interval is None:
        return None
    values = [int(v) for v in interval]
    if len(values) != 2 or not 0 <= values[0] <= values[1] < num_timesteps:
        raise ValueError(f"{key}={list(interval)}: expected [lo, hi] timesteps with "
                         f"0 <= lo <= hi < {num_timesteps}, or null for guidance at every step")
    return values
