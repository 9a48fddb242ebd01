"""Scene coordinates for grid encodings: the scene box to the encoding's unit cube, and mip-NeRF 360's contraction
of all of space into it for unbounded scenes (the hash grid's field and the proposal networks map points alike)."""
from __future__ import annotations

import torch
from torch import Tensor

CONTRACTIONS = ("none", "l2", "linf")


def contract(x: Tensor, kind: str = "l2") -> Tensor:
    """mip-NeRF 360's scene contraction: x inside the unit ball (or cube, `linf`), else (2 - 1/|x|) x/|x|,
    so all of space lands within norm 2. `none` returns x."""
    if kind == "none":
        return x
    if kind not in CONTRACTIONS:
        raise ValueError(f"contraction must be one of {CONTRACTIONS}, got {kind!r}")
    norm = x.norm(dim=-1, keepdim=True) if kind == "l2" else x.abs().amax(-1, keepdim=True)
    safe = norm.clamp_min(1.0)  # the outer branch only ever sees |x| > 1: no division by 0, no NaN gradient
    return torch.where(norm <= 1.0, x, (2.0 - 1.0 / safe) * x / safe)


def box_share(contraction: str) -> float:
    """The share of the encoding's unit cube (along each side) the scene box spans in `box_to_unit`: all of it,
    or the middle half with a contraction (the rest holds all of space)."""
    return 1.0 if contraction == "none" else 0.5


def box_to_unit(points: Tensor, aabb: Tensor, contraction: str = "none") -> tuple[Tensor, Tensor]:
    """Encoding coordinates in [0, 1]^3 of scene points and whether each is inside: the box `aabb` goes to
    [-1, 1]^3, then (with a contraction) all of space to [-2, 2]^3, which is scaled into the unit cube."""
    lo, hi = aabb[:3], aabb[3:]
    x = (points.float() - lo) / (hi - lo) * 2.0 - 1.0
    if contraction != "none":
        return (contract(x, contraction) + 2.0) / 4.0, torch.ones_like(x[..., 0], dtype=torch.bool)
    return (x + 1.0) / 2.0, (x.abs() <= 1.0).all(-1)
