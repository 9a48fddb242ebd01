"""Pinhole cameras: rays for pixels, OpenCV lens undistortion, NDC rays and camera paths.

Conventions (those of the Blender / instant-ngp files): a 4x4 camera-to-world matrix in the
OpenGL frame (x right, y up, the camera looks down -z). Rays go through pixel centres
(u + 0.5, v + 0.5). Directions are NOT normalised: their z component in the camera frame is -1,
so the ray parameter t is depth along the optical axis and near/far are depths.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def pixel_grid(height: int, width: int, device=None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates (u, v), each (H*W,), row-major (v is the row)."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return u.reshape(-1) + 0.5, v.reshape(-1) + 0.5


def distort(x: Tensor, y: Tensor, k1: float, k2: float, p1: float, p2: float) -> tuple[Tensor, Tensor]:
    """OpenCV radial-tangential model on normalised image coordinates."""
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return xd, yd


def undistort(xd: Tensor, yd: Tensor, k1: float, k2: float, p1: float, p2: float,
              iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Invert `distort` by Newton's method: the normalised coordinates whose distorted image is (xd, yd)."""
    x, y = xd.clone(), yd.clone()
    for _ in range(iterations):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dradial = 2 * k1 + 4 * k2 * r2  # d(radial)/d(r2) * 2 ... times x or y below
        fx, fy = distort(x, y, k1, k2, p1, p2)
        fx, fy = fx - xd, fy - yd
        # Jacobian of distort
        j_xx = radial + x * dradial * x + 2 * p1 * y + 6 * p2 * x
        j_xy = x * dradial * y + 2 * p1 * x + 2 * p2 * y
        j_yx = y * dradial * x + 2 * p1 * x + 2 * p2 * y
        j_yy = radial + y * dradial * y + 6 * p1 * y + 2 * p2 * x
        det = j_xx * j_yy - j_xy * j_yx
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        x = x - (j_yy * fx - j_xy * fy) / det
        y = y - (-j_yx * fx + j_xx * fy) / det
    return x, y


def camera_rays(c2w: Tensor, fx: float, fy: float, cx: float, cy: float, height: int, width: int,
                distortion: Tensor | list | None = None) -> tuple[Tensor, Tensor]:
    """Origins and directions (H*W, 3) of every pixel of one camera (c2w: 3x4 or 4x4)."""
    u, v = pixel_grid(height, width)
    x = (u - cx) / fx
    y = (v - cy) / fy
    if distortion is not None and any(float(k) != 0.0 for k in distortion):
        x, y = undistort(x, y, *[float(k) for k in distortion])
    # OpenCV image coordinates (y down, looking +z) to the OpenGL camera frame (y up, looking -z).
    dirs_cam = torch.stack([x, -y, -torch.ones_like(x)], dim=-1)
    c2w = c2w[:3, :4].to(torch.float32)
    dirs = dirs_cam @ c2w[:, :3].T
    origins = c2w[:, 3].expand_as(dirs).contiguous()
    return origins, dirs


def ndc_rays(origins: Tensor, dirs: Tensor, fx: float, fy: float, width: int, height: int,
             near: float = 1.0) -> tuple[Tensor, Tensor]:
    """Forward-facing scenes: map rays to normalised device coordinates (t in [0, 1] covers depth near..inf)."""
    t = -(near + origins[..., 2]) / dirs[..., 2]
    o = origins + t[..., None] * dirs
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = dirs.unbind(-1)
    o0 = -1.0 / (width / (2.0 * fx)) * ox / oz
    o1 = -1.0 / (height / (2.0 * fy)) * oy / oz
    o2 = 1.0 + 2.0 * near / oz
    d0 = -1.0 / (width / (2.0 * fx)) * (dx / dz - ox / oz)
    d1 = -1.0 / (height / (2.0 * fy)) * (dy / dz - oy / oz)
    d2 = -2.0 * near / oz
    return torch.stack([o0, o1, o2], -1), torch.stack([d0, d1, d2], -1)


def look_at(position: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """A 4x4 OpenGL camera-to-world matrix at `position` looking at `target`."""
    z = position - target
    z = z / z.norm()
    x = torch.linalg.cross(up, z)
    if x.norm() < 1e-6:  # looking along `up`: any perpendicular will do
        x = torch.linalg.cross(torch.tensor([1.0, 0.0, 0.0]), z)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, position
    return c2w


def focus_point(c2w: Tensor) -> Tensor:
    """The point closest (least squares) to every camera's optical axis: what the cameras look at."""
    origins, axes = c2w[:, :3, 3].double(), -c2w[:, :3, 2].double()
    axes = axes / axes.norm(dim=-1, keepdim=True)
    eye = torch.eye(3, dtype=torch.float64)
    proj = eye - axes[:, :, None] * axes[:, None, :]
    a = proj.sum(0)
    b = (proj @ origins[:, :, None]).sum(0)
    if torch.linalg.matrix_rank(a) < 3:  # parallel axes (forward-facing): use the mean position
        return origins.mean(0).float()
    return torch.linalg.solve(a, b)[:, 0].float()


def mean_up(c2w: Tensor) -> Tensor:
    """The normal of the plane the cameras lie in (turned towards their mean up axis); that axis if they don't span one."""
    mean_y = c2w[:, :3, 1].mean(0)
    mean_y = mean_y / mean_y.norm()
    positions = c2w[:, :3, 3] - c2w[:, :3, 3].mean(0)
    if len(c2w) >= 3:
        _, s, vh = torch.linalg.svd(positions.double(), full_matrices=False)
        if s[1] > 1e-3 * s[0]:
            normal = vh[2].float()
            return normal if normal @ mean_y >= 0 else -normal
    return mean_y


def orbit_path(c2w: Tensor, num_frames: int) -> Tensor:
    """A circle around the cameras' focus point at their mean distance and height: (num_frames, 4, 4)."""
    c2w = c2w.float()
    center = focus_point(c2w)
    up = mean_up(c2w)
    offsets = c2w[:, :3, 3] - center
    height = (offsets @ up).mean()
    radial = offsets - (offsets @ up)[:, None] * up
    radius = radial.norm(dim=-1).mean()
    e1 = radial[0] / radial[0].norm().clamp_min(1e-8)
    e2 = torch.linalg.cross(up, e1)
    frames = []
    for k in range(num_frames):
        a = 2 * math.pi * k / num_frames
        pos = center + height * up + radius * (math.cos(a) * e1 + math.sin(a) * e2)
        frames.append(look_at(pos, center, up))
    return torch.stack(frames)


def spiral_path(c2w: Tensor, num_frames: int, rotations: float = 2.0) -> Tensor:
    """Forward-facing scenes: the mean camera moved on a small spiral, keeping its orientation."""
    c2w = c2w.float()
    mean = c2w[:, :3, :4].mean(0)
    x, y, z = (mean[:, i] / mean[:, i].norm() for i in range(3))
    spread = (c2w[:, :3, 3] - mean[:, 3]).abs().quantile(0.9, dim=0).clamp_min(1e-3)
    rx, ry = float(spread @ x.abs()), float(spread @ y.abs())
    frames = []
    for k in range(num_frames):
        a = 2 * math.pi * rotations * k / num_frames
        pos = mean[:, 3] + rx * math.cos(a) * x + ry * math.sin(a) * y + 0.5 * rx * math.sin(a / rotations) * z
        frame = torch.eye(4)
        frame[:3, 0], frame[:3, 1], frame[:3, 2], frame[:3, 3] = x, y, z, pos
        frames.append(frame)
    return torch.stack(frames)
