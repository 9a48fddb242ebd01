from lightning_modules.diffusion.module import DiffusionModule, guided, make_noise_scheduler

__all__ = ["DiffusionModule", "guided", "make_noise_scheduler"]
