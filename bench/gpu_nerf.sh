#!/usr/bin/env bash
# Issue 28 on one lent GPU (../shared/gpu/README.md): the hash kernels' GPU test and speed, then chosen
# time-to-quality profiles (lightning_modules/nerf/benchmark.py QUALITY), each a run from scratch.
#   bash bench/gpu_nerf.sh hashgrid_builtin,mlp_builtin,hashgrid_fox,mlp_fox   (about 8 minutes)
#   bash bench/gpu_nerf.sh hashgrid_fern                                       (about 6 minutes; mlp_fern alone too)
# Carry .gpu-wheels and the scenes: copy ../shared/data/nerf/{fox,fern} into .gpu-data/nerf/ (git-ignored)
# and name .gpu-data/nerf in carry. Results: $OUT/quality.md and quality.json, $OUT/hash_encoding.md.
# NERF_CHECKS=0 skips the GPU test and the kernel timing (when they ran already on this commit).
set -u
cd "$(dirname "$0")/.."
profiles=${1:?usage: bash bench/gpu_nerf.sh PROFILE[,PROFILE...]}
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf==2.3.1 diffusers nvidia-ml-py \
    2>&1 | grep -v WARNING | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
fi
nvidia-smi --query-gpu=name --format=csv,noheader
export WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out/gpu_nerf}; mkdir -p "$OUT" bench_out  # a fresh machine has no bench_out: the log below goes there
if [ "${NERF_CHECKS:-1}" != 0 ]; then
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/nerf/test_gpu.py 2>&1 | tail -3
  timeout 60 python3 -m bench.hash_encoding | tee "$OUT/hash_encoding.md"
fi
timeout "${QUALITY_TIMEOUT:-480}" python3 -m bench.quality --tasks nerf --profiles "$profiles" --data-root .gpu-data \
  --out bench_out/quality_nerf > bench_out/quality_nerf.log 2>&1
echo "== quality exit $?"; grep -E "Error|failed" bench_out/quality_nerf.log | tail -5
cp bench_out/quality_nerf/quality.md bench_out/quality_nerf/quality.json "$OUT/" 2>/dev/null; cat "$OUT/quality.md" 2>/dev/null
