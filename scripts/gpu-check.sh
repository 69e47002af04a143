#!/usr/bin/env bash
# The prepared GPU check: one short script (a few minutes on one modern GPU) that writes a
# Markdown table of rankpilot's CUDA path side by side with transformers + peft on the same GPU.
#
#   bash scripts/gpu-check.sh            # writes runs/gpu-check/gpu-check.md (or $OUT/gpu-check.md)
#
# It runs, in order: `doctor`; `bench finetune` on a model large enough to load the GPU
# (12 layers × 1024, vocabulary 32 000, sequence 1024, batch 8, rank 8 on all seven projections)
# in f32 and in bf16, each against transformers + peft; `bench svd` on CUDA against PyTorch; and a
# short scheduled `compare` (pretrain a tiny model on the GPU, then fixed / adalora / squeeze /
# the shipped policy at an equal budget, 2 seeds).
#
# It needs what `make build` needs (scripts/setup.sh installs libtorch 2.13 from PyPI, which
# includes CUDA on Linux x86-64) and an NVIDIA driver. Settings for a dry run elsewhere:
#   DEVICE (default cuda), SIZE (default large), STEPS (timed steps, default 10),
#   COMPARE_STEPS (default 120), SKIP_FULL_SVD (set: leave out the 4096×4096 full SVDs).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=${OUT:-$root/runs/gpu-check}
device=${DEVICE:-cuda}
size=${SIZE:-large}
steps=${STEPS:-10}
compare_steps=${COMPARE_STEPS:-120}
mkdir -p "$out"
report=$out/gpu-check.md
log=$out/gpu-check.log
say() { printf '[gpu-check] %s\n' "$*" >&2; }

say "building (log: $log)"
make build >"$log" 2>&1
bin=$root/target/release/rankpilot

gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
{
  echo "# rankpilot GPU check, $(date -u +%F)"
  echo
  echo "GPU: ${gpu:-none reported by nvidia-smi}; device \`$device\`; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '## doctor'
  echo
  echo '```'
  "$bin" doctor --device "$device" 2>&1
  echo '```'
  echo
} >"$report"

for precision in f32 bf16; do
  say "bench finetune ($size, $precision)"
  flag=(); [[ $precision == bf16 ]] && flag=(--bf16)
  "$bin" bench finetune --device "$device" --model-size "$size" --steps "$steps" "${flag[@]}" >>"$report" 2>>"$log"
  echo >>"$report"
done

say "bench svd"
svd_flags=(); [[ -n ${SKIP_FULL_SVD:-} ]] && svd_flags=(--skip-full-svd)
"$bin" bench svd --device "$device" --repeats 5 "${svd_flags[@]}" >>"$report" 2>>"$log"
echo >>"$report"

say "short scheduled compare"
work=$out/compare
"$bin" pretrain --out "$work/model" --logdir "$work/pretrain" --steps 300 --seed 0 --device "$device" >>"$log" 2>&1
"$bin" compare --model "$work/model" --env none --budget rank:8 --seeds 2 --seed 0 --steps "$compare_steps" \
  --rounds 6 --device "$device" --schedulers fixed,adalora,squeeze,policy:checkpoints/default \
  --logdir "$work/runs" >>"$log" 2>&1
{
  echo '## Short scheduled compare'
  echo
  cat "$work/runs"/*.md 2>/dev/null || echo "(no compare table found in $work/runs)"
} >>"$report"
say "done: $report"
