#!/usr/bin/env bash
# Issue 28 on one lent GPU (../shared/gpu/README.md): the hash kernels' GPU test and speed, then chosen
# time-to-quality runs (lightning_modules/nerf/benchmark.py QUALITY), each a run from scratch. Each argument is
# one run: a profile (or a comma list), then any `-o nerf:key=value` settings for it.
#   bash bench/gpu_nerf.sh hashgrid_builtin,mlp_builtin,hashgrid_fox,mlp_fox   (about 8 minutes)
#   bash bench/gpu_nerf.sh hashgrid_fern                                       (about 6 minutes; mlp_fern alone too)
#   NERF_CHECKS=0 bash bench/gpu_nerf.sh "hashgrid_fern -o nerf:model.occupancy_distortion_loss_mult=0.002" "hashgrid_fox_proposal"
# Carry .gpu-wheels and the scenes: copy ../shared/data/nerf/{fox,fern} into .gpu-data/nerf/ (git-ignored)
# and name .gpu-data/nerf in carry. Results: $OUT/quality_<n>.md and .json (n: the argument's place), the
# validation PSNR every 500 steps, and $OUT/hash_encoding.md. NERF_CHECKS=0 skips the GPU test and the kernel
# timing (when they ran already on this commit); QUALITY_TIMEOUT bounds each run (s, default 480). Each run compiles
# from a cold cache of its own, as a user's first run; COMPILE_CACHE=DIR shares one among this call's runs, so a
# profile given twice measures a user's first and repeated run (compiled kernels loaded from the cache).
set -u
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash bench/gpu_nerf.sh 'PROFILE[,PROFILE...] [-o nerf:key=value ...]' ..."; exit 2; }
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf==2.3.1 diffusers nvidia-ml-py \
    2>&1 | grep -v WARNING | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
fi
nvidia-smi --query-gpu=name --format=csv,noheader
export WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out/gpu_nerf}; mkdir -p "$OUT" bench_out  # a fresh machine has no bench_out: the logs go there
if [ "${NERF_CHECKS:-1}" != 0 ]; then
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/nerf/test_gpu.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -12  # compiles included
  timeout 60 python3 -m bench.hash_encoding | tee "$OUT/hash_encoding.md"
fi
n=0
for spec in "$@"; do
  n=$((n + 1)); run=bench_out/quality_nerf_$n
  set -f; words=($spec); set +f  # the profile, then its -o settings (split on any blank, newlines too; no globbing)
  [ ${#words[@]} -gt 0 ] || { echo "run $n: empty, skipped"; continue; }
  [ -n "${COMPILE_CACHE:-}" ] && words+=(-o "nerf:paths.compile_cache_dir=$(realpath -m "$COMPILE_CACHE")")
  echo "== run $n: ${words[*]}"
  rm -rf "$run"  # a second call on a warm machine: its run dirs would refuse the same run names
  timeout "${QUALITY_TIMEOUT:-480}" python3 -m bench.quality --tasks nerf --profiles "${words[0]}" --data-root .gpu-data \
    --out "$run" "${words[@]:1}" > "$run.log" 2>&1
  echo "exit $?"; grep -E "Error|failed" "$run.log" | tail -5
  grep -E "^\| nerf" "$run/quality.md" 2>/dev/null
  grep -E "first optimizer step|^compile:" "$run.log" | head -4
  find "$run" -name metrics.csv | sort | xargs -r python3 -c "
import csv, sys
for path in sys.argv[1:]:
    rows = list(csv.DictReader(open(path)))
    print('validation PSNR every 500 steps:', [(r['step'], round(float(r['val/psnr']), 2)) for r in rows if r.get('val/psnr')])
    cut = [(r['step'], round(float(r.get('train/march_budget_used') or 'nan'), 3), round(float(r['train/budget_used']), 3),
            round(float(r['train/incomplete_rays']), 4)) for r in rows if r.get('train/budget_used')]
    if cut: print('sample budget (step, march slots used, shading slots used, rays cut), every 10th log:', cut[::10])"
  cp "$run/quality.md" "$OUT/quality_$n.md" 2>/dev/null; cp "$run/quality.json" "$OUT/quality_$n.json" 2>/dev/null
  cp "$run.log" "$OUT/quality_$n.log" 2>/dev/null
done
