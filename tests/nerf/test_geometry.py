"""Rays, encoding, sampling and compositing against hand-computed values."""
import math

import pytest
import torch

from datamodules.nerf import cameras
from lightning_modules.nerf import rendering
from lightning_modules.nerf.network import NeRFMLP, PositionalEncoding
from lightning_modules.nerf.occupancy import OccupancyGrid


def test_rays_of_identity_camera_match_hand_computed():
    origins, dirs = cameras.camera_rays(torch.eye(4), fx=10.0, fy=20.0, cx=2.0, cy=1.5, height=3, width=4)
    assert origins.shape == dirs.shape == (12, 3)
    assert torch.allclose(origins, torch.zeros(12, 3))
    # pixel (u=0, v=0): centre (0.5, 0.5) -> x = (0.5-2)/10, y = -(0.5-1.5)/20 (image y is down), z = -1
    assert torch.allclose(dirs[0], torch.tensor([-0.15, 0.05, -1.0]))
    # pixel (u=3, v=2) is the last one, row-major
    assert torch.allclose(dirs[-1], torch.tensor([(3.5 - 2) / 10, -(2.5 - 1.5) / 20, -1.0]))


def test_rays_follow_camera_pose():
    # camera at (1, 2, 3) turned 90 degrees about +y: its -z (forward) becomes -x in the world
    c2w = torch.tensor([[0.0, 0, 1, 1], [0, 1, 0, 2], [-1, 0, 0, 3], [0, 0, 0, 1]])
    origins, dirs = cameras.camera_rays(c2w, 1.0, 1.0, 0.5, 0.5, 1, 1)
    assert torch.allclose(origins[0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(dirs[0], torch.tensor([-1.0, 0.0, 0.0]))


def test_undistortion_inverts_the_opencv_model():
    k = (0.0578, -0.0805, -0.00098, 0.00016)  # the fox's lens
    xd, yd = torch.rand(500) - 0.5, torch.rand(500) - 0.5
    x, y = cameras.undistort(xd, yd, *k)
    rx, ry = cameras.distort(x, y, *k)
    assert torch.allclose(rx, xd, atol=1e-6) and torch.allclose(ry, yd, atol=1e-6)
    assert not torch.allclose(x, xd, atol=1e-4)  # distortion is not ignored


def test_distorted_camera_rays_reproject_to_their_pixels():
    k = torch.tensor([0.2, -0.1, 0.01, -0.02])
    _, dirs = cameras.camera_rays(torch.eye(4), 8.0, 8.0, 4.0, 3.0, 6, 8, k)
    x, y = dirs[:, 0] / -dirs[:, 2], -dirs[:, 1] / -dirs[:, 2]
    xd, yd = cameras.distort(x, y, *k.tolist())
    u, v = cameras.pixel_grid(6, 8)
    assert torch.allclose(xd * 8 + 4, u, atol=1e-4) and torch.allclose(yd * 8 + 3, v, atol=1e-4)


def test_ndc_maps_near_plane_to_minus_one():
    origins = torch.zeros(1, 3)
    dirs = torch.tensor([[0.1, 0.05, -1.0]])
    o, d = cameras.ndc_rays(origins, dirs, fx=2.0, fy=2.0, width=4, height=4, near=1.0)
    assert o[0, 2].item() == pytest.approx(-1.0)
    assert (o + d)[0, 2].item() == pytest.approx(1.0)  # t = 1 is infinitely far


def test_orbit_path_circles_the_focus_point():
    poses = torch.stack([cameras.look_at(torch.tensor([4 * math.cos(a), 4 * math.sin(a), 1.0]),
                                         torch.zeros(3), torch.tensor([0.0, 0, 1])) for a in (0.0, 1.0, 2.5)])
    path = cameras.orbit_path(poses, 8)
    assert path.shape == (8, 4, 4)
    assert torch.allclose(cameras.focus_point(poses), torch.zeros(3), atol=1e-4)
    radius = path[:, :2, 3].norm(dim=-1)
    assert torch.allclose(radius, torch.full((8,), 4.0), atol=1e-3)


def test_positional_encoding_values():
    enc = PositionalEncoding(2)
    x = torch.tensor([[0.5, 0.0, 1.0]])
    out = enc(x)
    assert out.shape == (1, enc.out_dim()) == (1, 15)
    # layout: [x, sin(f0 x), sin(f1 x), cos(f0 x), cos(f1 x)] with f = 1, 2, each over xyz
    assert torch.allclose(out[0, :3], x[0])
    assert out[0, 3].item() == pytest.approx(math.sin(0.5))
    assert out[0, 6].item() == pytest.approx(math.sin(1.0))
    assert out[0, 9].item() == pytest.approx(math.cos(0.5))


def test_mlp_shapes_and_checkpointing_agree():
    net = NeRFMLP(depth=4, width=16, skips=(2,), pos_freqs=3, dir_freqs=2)
    pts, dirs = torch.randn(5, 7, 3), torch.nn.functional.normalize(torch.randn(5, 7, 3), dim=-1)
    sigma, rgb = net(pts, dirs)
    assert sigma.shape == (5, 7) and rgb.shape == (5, 7, 3)
    net.gradient_checkpointing = True
    sigma2, _ = net(pts, dirs)
    assert torch.allclose(sigma, sigma2)


def test_compositing_a_known_density_field():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    sigma = torch.tensor([[math.log(2), math.log(2), 0.0]])  # alpha = 0.5, 0.5, 0 over unit intervals
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    out = rendering.composite(rgb, sigma, t, torch.tensor([[0.0, 0.0, -1.0]]), torch.ones(3))
    assert torch.allclose(out["weights"], torch.tensor([[0.5, 0.25, 0.0]]), atol=1e-6)
    assert out["acc"].item() == pytest.approx(0.75)
    assert torch.allclose(out["rgb"], torch.tensor([[0.75, 0.5, 0.25]]), atol=1e-6)  # + 0.25 white
    assert out["depth"].item() == pytest.approx((0.5 * 1 + 0.25 * 2) / 0.75)


def test_compositing_scales_intervals_by_ray_length():
    t = torch.tensor([[1.0, 2.0]])
    sigma = torch.tensor([[math.log(2), 0.0]])
    rgb = torch.zeros(1, 2, 3)
    out = rendering.composite(rgb, sigma, t, torch.tensor([[0.0, 0.0, -2.0]]), torch.ones(3))
    assert out["acc"].item() == pytest.approx(0.75)  # the interval is 2 units long: alpha = 1 - 1/4


def test_opaque_wall_gives_its_depth_and_colour():
    t = torch.linspace(2, 6, 65)[None]
    sigma = torch.where(t > 4.0, torch.tensor(1e4), torch.tensor(0.0))
    rgb = torch.tensor([0.2, 0.4, 0.6]).expand(1, 65, 3)
    out = rendering.composite(rgb, sigma, t, torch.tensor([[0.0, 0, -1]]), torch.ones(3))
    assert torch.allclose(out["rgb"], torch.tensor([[0.2, 0.4, 0.6]]), atol=1e-4)
    assert out["depth"].item() == pytest.approx(4.0625, abs=1e-3)


def test_stratified_samples_stay_in_their_bins():
    near, far = torch.full((100, 1), 2.0), torch.full((100, 1), 6.0)
    t = rendering.stratified_samples(near, far, 8, perturb=True)
    edges = torch.linspace(2, 6, 9)
    assert ((t >= edges[:-1]) & (t <= edges[1:])).all()
    mid = rendering.stratified_samples(near, far, 8, perturb=False)
    assert torch.allclose(mid[0], 0.5 * (edges[:-1] + edges[1:]))


def test_hierarchical_sampler_follows_the_weights():
    torch.manual_seed(0)
    bins = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4000, 4)
    weights = torch.tensor([[1.0, 3.0, 0.0]]).expand(4000, 3)
    t = rendering.sample_pdf(bins, weights, 16, deterministic=False)
    assert t.shape == (4000, 16)
    assert ((t >= 0) & (t <= 3)).all()
    frac_second = ((t >= 1) & (t < 2)).float().mean().item()
    assert frac_second == pytest.approx(0.75, abs=0.02)
    assert (t >= 2).float().mean().item() < 0.01  # a zero-weight bin gets (almost) nothing
    inside = t[(t >= 1) & (t < 2)]
    assert inside.mean().item() == pytest.approx(1.5, abs=0.02)  # uniform within a bin
    det = rendering.sample_pdf(bins[:1], weights[:1], 5, deterministic=True)
    assert torch.all(det[:, 1:] >= det[:, :-1])


def test_occupancy_grid_marks_a_sphere():
    grid = OccupancyGrid(resolution=16, warmup_steps=10)
    grid.set_aabb(torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    grid.update(lambda p: (p.norm(dim=-1) < 0.5).float() * 100.0, step=0)
    frac = grid.occupancy_fraction().item()
    assert frac == pytest.approx((4 / 3 * math.pi * 0.5**3) / 8, abs=0.04)
    assert grid.query(torch.tensor([[0.0, 0, 0], [0.9, 0.9, 0.9], [3.0, 0, 0]])).tolist() == [True, False, False]


@pytest.mark.parametrize("density,resolution", [(0.0, 8), (0.5, 8), (0.8984375, 100), (0.3, 100)])
def test_an_occupancy_grid_over_a_field_that_reads_the_same_everywhere_keeps_every_cell(density, resolution):
    """A fresh field under bf16 reads one density everywhere, too faint for the threshold: emptying the grid
    there left LLFF fern with no samples to train on (GPU, s20: 4.8 dB for 5 minutes). At 100^3 cells the
    float32 mean of equal values can come out a rounding above each of them."""
    grid = OccupancyGrid(resolution=resolution, warmup_steps=10, march_samples=512)
    grid.set_aabb(torch.tensor([-1.5, -1.5, -1, 1.5, 1.5, 1]))  # fern's NDC box: one step's opacity is < 0.01
    grid.update(lambda p: torch.full(p.shape[:-1], density), step=0)
    assert grid.occupancy_fraction().item() == 1.0


def test_ray_box_intersection():
    t0, t1 = rendering.ray_aabb(torch.tensor([[0.0, 0, 5]]), torch.tensor([[0.0, 0, -1]]),
                                torch.tensor([-1.0, -1, -1, 1, 1, 1]))
    assert (t0.item(), t1.item()) == (pytest.approx(4.0), pytest.approx(6.0))
