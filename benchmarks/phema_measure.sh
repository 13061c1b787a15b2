#!/usr/bin/env bash
# Issue 25 item 3, the measurements behind the post-hoc EMA defaults, one after the other on this machine:
# the quickstart run of `make demo` (1,000 steps), a run of the same preset 4x longer (4,000 steps) and an
# unconditional run of it, each swept over the main model's length, the guide's time and length, g, and 10 against
# 20 sampling steps (benchmarks/phema_sweep.py; 500 samples, seed 0). Output: benchmarks/results/phema_*.txt.
#     bash benchmarks/phema_measure.sh            (about 90 minutes on the 2-core CPU)
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=benchmarks/results
mkdir -p "$OUT"
GRID=(--lengths 0.13 0.16 0.2 --guide-lengths 0.2 0.25 --guide-fractions 0.3 0.5 0.7 --weights 2 2.5 3 --no-own-guide)
[ -f runs/quickstart/latest ] || $BIN/ddpm train --preset quickstart --out runs/quickstart --quiet
[ -f runs/qs4000/model/model.safetensors ] || $BIN/ddpm train --preset quickstart --steps 4000 --out runs/qs4000 --quiet
for steps in 20 10; do
  $BIN/python benchmarks/phema_sweep.py runs/quickstart --steps $steps "${GRID[@]}" --tag grid$steps \
    > "$OUT/phema_quickstart_$steps.txt"
  $BIN/python benchmarks/phema_sweep.py runs/qs4000 --steps $steps "${GRID[@]}" --tag grid$steps \
    > "$OUT/phema_qs4000_$steps.txt"
done
[ -f runs/qs_uncond/model/model.safetensors ] || \
  $BIN/ddpm train --preset quickstart --no-conditional --out runs/qs_uncond --quiet
for steps in 20 10; do
  $BIN/python benchmarks/phema_sweep.py runs/qs_uncond --steps $steps "${GRID[@]}" --tag grid$steps \
    > "$OUT/phema_uncond_$steps.txt"
done
