"""The fused Triton hash encoding (issue 28) against the torch fallback, and how the backend is chosen.

This machine has no GPU: the kernels run in Triton's interpreter, which TRITON_INTERPRET=1 selects when
the kernels are defined, so the comparison runs in a child process and the setting stays out of this one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch

from lightning_modules.nerf import hash_kernel
from lightning_modules.nerf.hashgrid import HashEncoding, HashGridField
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {
    # level 0 (res 2) is dense, level 1 (res 8: 729 vertices > 64 rows) hashed; 3 features is not a power of 2
    "tiny": {"levels": 2, "log2_table_size": 6, "base_resolution": 2, "finest_resolution": 8, "features_per_level": 3},
    "default": {},  # 16 levels from 16 to 2048 cells, 2^19 rows: dense coarse levels and hashed fine ones
}
# on the faces and corners of the unit cube, and outside it (clamped onto it)
EDGE_POINTS = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.25], [-0.1, 1.2, 0.5]]
POINTS = 128
# the paths add the same products in different orders: the difference is float32 rounding
RELATIVE_TOLERANCE = 1e-5


def compare_backends(name: str, n_points: int, seed: int = 0) -> dict:
    """Run under TRITON_INTERPRET=1: both backends on the same random tables, points and output gradient.
    Gives the largest differences and the largest magnitudes of the features and of the table gradients."""
    torch.manual_seed(seed)
    reference = HashEncoding(backend="torch", **CONFIGS[name])
    with torch.no_grad():  # unit-scale features, so a wrong row shows as an error of order 1
        for table in reference.tables:
            table.normal_()
    fused = HashEncoding(backend="triton", **CONFIGS[name])
    fused.load_state_dict(reference.state_dict())
    points = torch.rand(n_points, 3)
    points[:len(EDGE_POINTS)] = torch.tensor(EDGE_POINTS)
    grad_out = torch.randn(n_points, reference.out_dim)
    outs = []
    for encoding in (fused, reference):
        out = encoding(points)
        (out * grad_out).sum().backward()
        outs.append(out.detach())
    grad_errors = [(a.grad - b.grad).abs().max().item() for a, b in zip(fused.tables, reference.tables, strict=True)]
    return {"interpreted": hash_kernel.INTERPRETED, "dtype": str(outs[0].dtype),
            "forward_error": (outs[0] - outs[1]).abs().max().item(), "forward_scale": outs[1].abs().max().item(),
            "grad_error": max(grad_errors), "grad_scale": max(t.grad.abs().max().item() for t in reference.tables)}


@pytest.fixture(scope="module")
def interpreted_comparisons():
    code = ("import json; from tests.nerf.test_hash_kernel import compare_backends, CONFIGS, POINTS; "
            "print(json.dumps({name: compare_backends(name, POINTS) for name in CONFIGS}))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_and_torch_paths_agree_in_values_and_table_gradients(interpreted_comparisons, name):
    result = interpreted_comparisons[name]
    assert result["interpreted"] and result["dtype"] == "torch.float32"
    assert result["forward_scale"] > 0.1 and result["grad_scale"] > 0.1, result  # a comparison of zeros proves nothing
    assert result["forward_error"] <= RELATIVE_TOLERANCE * result["forward_scale"], result
    assert result["grad_error"] <= RELATIVE_TOLERANCE * result["grad_scale"], result


def test_auto_encodes_cpu_points_with_torch():
    encoding = HashEncoding(**CONFIGS["tiny"])
    points = torch.rand(16, 3)
    assert encoding.backend == "auto" and encoding.backend_for(points) == "torch"
    explicit = HashEncoding(backend="torch", **CONFIGS["tiny"])
    explicit.load_state_dict(encoding.state_dict())
    assert torch.equal(encoding(points), explicit(points))


def test_auto_keeps_the_deterministic_torch_path_when_deterministic_algorithms_are_on():
    """The kernels' backward adds with unordered atomics: `deterministic=true` runs get the torch path."""
    encoding = HashEncoding(**CONFIGS["tiny"])
    cuda_points = SimpleNamespace(is_cuda=True, requires_grad=False)  # what auto reads of CUDA points
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert encoding.backend_for(cuda_points) == "triton"
        torch.use_deterministic_algorithms(True)
        assert encoding.backend_for(cuda_points) == "torch"
    finally:
        torch.use_deterministic_algorithms(before)


def test_explicit_triton_on_cpu_points_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hash_kernel, "INTERPRETED", False)  # as outside the interpreter, whatever the environment
    encoding = HashEncoding(backend="triton", **CONFIGS["tiny"])
    with pytest.raises(ValueError, match="CUDA device, got cpu.*backend='torch'"):
        encoding(torch.rand(4, 3))


def test_the_fused_path_refuses_points_that_require_grad(monkeypatch):
    monkeypatch.setattr(hash_kernel, "INTERPRETED", True)  # past the device check: the refusal comes before a launch
    encoding = HashEncoding(backend="triton", **CONFIGS["tiny"])
    with pytest.raises(ValueError, match="no gradient w.r.t. the points"):
        encoding(torch.rand(4, 3, requires_grad=True))


def test_the_backend_setting_reaches_the_encoding(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        HashEncoding(backend="cuda")
    net = compose_config(tmp_path, "model=nerf", "nerf_net=hashgrid", "model.net.backend=torch",
                         "model.net.levels=2", "model.net.log2_table_size=8").model.net
    field = hydra.utils.instantiate(net)
    assert isinstance(field, HashGridField) and field.encoding.backend == "torch"
    assert HashGridField(levels=2, log2_table_size=8).encoding.backend == "auto"  # the yaml's default too


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the bench runs: tests/nerf/test_gpu.py checks the kernels")
def test_the_backend_bench_says_it_needs_a_gpu():
    from bench.hash_encoding import main

    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main([])


def test_the_triton_backward_refuses_deterministic_runs_by_naming_the_torch_backend():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(False)
        hash_kernel.check_deterministic()  # nothing to say
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="model.net.backend=torch"):
            hash_kernel.check_deterministic()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="unordered atomics"):
            hash_kernel.check_deterministic()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
