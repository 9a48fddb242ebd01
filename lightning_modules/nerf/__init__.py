"""NeRF: positional encoding, the NeRF MLP, hierarchical volume rendering and an occupancy-grid renderer."""
from lightning_modules.nerf.module import NerfModule

__all__ = ["NerfModule"]
