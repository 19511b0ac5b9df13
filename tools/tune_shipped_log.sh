#!/usr/bin/env bash
# Re-create the shipped x86 tuning log (schedules/x86) on this machine: every workload that
# `autotune bench` measures, with the budgets behind the published figures (README, "Tuning").
# Appends (resumes) when the log exists; each command prints its trials, tasks and seconds.
# A run can end under its budget: MetaSchedule stops a kernel whose search has converged.
#   bash tools/tune_shipped_log.sh            # all
#   bash tools/tune_shipped_log.sh dit-block  # one
#   bash tools/tune_shipped_log.sh quantized  # the bf16 / int8 kernels (QUANTIZED below)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
LOG=schedules/x86
declare -A TRIALS=(
  [dit-block]=800
  [vae-up-block]=300
  [tiny-transformer]=400
  [tiny-vae-decoder]=300
  [tiny-image-encoder]=150
)
# The DiT block's largest matmuls tuned alone (same kernels: the block's records), IN OUT TRIALS.
declare -A LINEARS=(
  [linear-1536]="1536 1536 160"   # q/k/v/o projections: 6 calls per block
  [linear-ffn-up]="1536 8960 96"  # FFN up, the block's largest matmul
)
# The quantized kernels (their own tasks: --quantize must match the build's), "WORKLOAD MODE TRIALS
# [PER_KERNEL]". All tuned on an AMD Zen 4 (AVX512-BF16, VNNI kernels); the budgets approximate the
# runs behind the shipped records (vae-up-block bf16 had 79 trials, one search round per kernel). The
# tiny VAE decoder's ~200 light kernels each need a batch: a cap of 8 per kernel leaves them budget.
QUANTIZED=(
  "dit-block bf16 320" "tiny-transformer bf16 190" "vae-up-block bf16 100"
  "dit-block w8a8 320" "dit-block int8-weight 240" "vae-up-block w8a8 128" "vae-up-block int8-weight 96"
  "tiny-transformer w8a8 120" "tiny-transformer int8-weight 120"
  "tiny-image-encoder w8a8 48" "tiny-image-encoder int8-weight 48" "tiny-image-encoder bf16 48"
  "tiny-vae-decoder int8-weight 760 8" "tiny-vae-decoder bf16 1300 8" "tiny-vae-decoder w8a8 1200 8"
)
if [ "${1:-}" = quantized ]; then
  for entry in "${QUANTIZED[@]}"; do
    read -r name mode trials per_kernel <<<"$entry"
    echo "== $name --quantize $mode: $trials trials"
    autotune tune --model "$name" --quantize "$mode" --target x86 --log "$LOG" --trials "$trials" \
      ${per_kernel:+--trials-per-task "$per_kernel"}
  done
  autotune compact --log "$LOG"  # the new lines into the gzipped parts the package ships
  exit 0
fi
for name in ${@:-linear-1536 dit-block linear-ffn-up vae-up-block tiny-transformer tiny-vae-decoder tiny-image-encoder}; do
  if [ -n "${LINEARS[$name]:-}" ]; then
    read -r in out trials <<<"${LINEARS[$name]}"
    echo "== $name: 1560x$in -> $out, $trials trials"
    python - "$in" "$out" "$trials" <<'PY'
import sys
import torch
from autotune.frontend.importer import from_torch
from autotune.support.settings import TuneSettings
from autotune.tuning.tune import tune
fin, fout, trials = map(int, sys.argv[1:])
torch.manual_seed(0)
print(tune(from_torch(torch.nn.Linear(fin, fout).eval(), {"x": torch.randn(1, 1560, fin)}), "x86",
           "schedules/x86", TuneSettings(trials=trials)).summary())
PY
    continue
  fi
  echo "== $name: ${TRIALS[$name]} trials"
  autotune tune --model "$name" --target x86 --log "$LOG" --trials "${TRIALS[$name]}"
done
autotune compact --log "$LOG"  # the new lines into the gzipped parts the package ships
