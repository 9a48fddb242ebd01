"""`python -m bench.step_profile TASK`: a user asking where a step's time goes gets the step time, the kernels
by kind, the host syncs and the profiler tables, after the warm-up steps they asked for."""
from __future__ import annotations

import pytest

from bench import step_profile
from tests.clinical.test_run import SMALL


@pytest.mark.parametrize("name,expected", [
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "layout"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", "attention"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_bias_TNN", "matmul"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("triton_poi_fused_relu_threshold_backward_view_15", "fused or elementwise")])
def test_kernels_are_grouped_by_what_they_do(name, expected):
    assert step_profile.kind(name) == expected


def test_the_profile_prints_the_window_after_the_warm_up_and_stops_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(step_profile, "ROOT", tmp_path)
    step_profile.main(["clinical", "device=cpu", "num_workers=0", *SMALL, "--start", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "step: " in out and "(mean of 2)" in out and "host syncs in 2 steps: 0" in out
    report = next((tmp_path / "bench_out" / "step_profile").glob("clinical_*/step_profile.txt"))
    assert "Self CPU" in report.read_text()
