#!/usr/bin/env bash
# Issue 25 item 3, the measurements behind the post-hoc EMA defaults, one after the other on this machine:
# the quickstart run of `make demo` (1,000 steps), a run of the same preset 4x longer (4,000 steps) and an
# unconditional run of it, each swept over the main model's length, the guide's time and g at 20 sampling steps,
# and the middle length at 10 steps (benchmarks/phema_sweep.py; 500 samples, seed 0).
# Output: benchmarks/results/phema_*.txt.     bash benchmarks/phema_measure.sh   (about 40 minutes on 2 cores
# once the runs exist; the 4,000-step run takes about 10 minutes more on an idle machine)
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
GRID=(--lengths 0.13 0.16 0.2 --guide-lengths 0.2 --guide-fractions 0.3 0.5 0.7 --no-own-guide)
SHORT=(--lengths 0.16 --guide-lengths 0.2 --guide-fractions 0.3 0.5 0.7 --weights 2.5 3 --no-own-guide)
train() {  # RUN, flags: train unless the run has finished
  local run=$1; shift
  if [ ! -f "$run/model/model.safetensors" ]; then
    if [ -f "$run/latest" ]; then $BIN/ddpm train --resume "$run" --quiet; else $BIN/ddpm train "$@" --out "$run" --quiet; fi
  fi
}
train runs/quickstart --preset quickstart
train runs/qs4000 --preset quickstart --steps 4000
for run in quickstart qs4000; do
  $BIN/python benchmarks/phema_sweep.py runs/$run --steps 20 "${GRID[@]}" --weights 2 2.5 3 --tag grid20 \
    > "$OUT/phema_${run}_20.txt"
  $BIN/python benchmarks/phema_sweep.py runs/$run --steps 10 "${SHORT[@]}" --tag grid10 > "$OUT/phema_${run}_10.txt"
done
train runs/qs_uncond --preset quickstart --no-conditional
$BIN/python benchmarks/phema_sweep.py runs/qs_uncond --steps 20 "${GRID[@]}" --weights 2 2.5 --tag grid20 \
  > "$OUT/phema_qs_uncond_20.txt"
