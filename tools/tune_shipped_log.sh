#!/usr/bin/env bash
# Re-create the shipped x86 tuning log (schedules/x86) on this machine: every workload that
# `autotune bench` measures, with the budgets behind the published figures. Appends (resumes)
# when the log exists; each command prints its trials, tasks and seconds at the end.
#   bash tools/tune_shipped_log.sh            # all
#   bash tools/tune_shipped_log.sh dit-block  # one
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
for w in "${@:-dit-block vae-up-block tiny-transformer tiny-vae-decoder tiny-image-encoder}"; do
  for name in $w; do
    echo "== $name: ${TRIALS[$name]} trials"
    autotune tune --model "$name" --target x86 --log "$LOG" --trials "${TRIALS[$name]}"
  done
done
