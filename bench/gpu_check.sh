#!/usr/bin/env bash
# One GPU, after a change that touches data loading, callbacks or the step: the GPU tests, every task's
# fast_dev_run on cuda with loader workers, and clinical and diffusion beside the plain loop.
# On the lent GPU machine (../shared/gpu/README.md): carry .gpu-wheels; results go under $OUT (or bench_out/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out/gpu_check}
mkdir -p "$OUT"
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf==2.3.1 diffusers pycocotools \
    faster-coco-eval nvidia-ml-py 2>&1 | grep -v WARNING | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
fi
nvidia-smi --query-gpu=name --format=csv,noheader
export WANDB_MODE=offline HF_HUB_OFFLINE=1
echo "== GPU tests"; timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -4
for task in nerf clinical diffusion license_plate; do
  start=$(date +%s)
  timeout 150 python3 run.py model=$task debug=fast_dev_run device=cuda logger=csv num_workers=2 run_name=fdr_$task \
    paths.root_dir="$OUT/runs" > "$OUT/fdr_$task.log" 2>&1
  echo "== fast_dev_run $task on cuda: exit $? in $(( $(date +%s) - start )) s"
done
echo "== bench"; timeout 240 python3 -m bench --quick --tasks clinical,diffusion --out bench_out/gpu_check_bench --data-dir bench_out/data 2>&1 | tail -40; cp bench_out/gpu_check_bench/results.* "$OUT/" 2>/dev/null
