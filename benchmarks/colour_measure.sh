#!/usr/bin/env bash
# Issue 36: the colour benchmark, the quickstart's counterpart on the bundled photos (RGB, one class per source
# photo, 32x32). Trains the photos32 preset (or continues RUN to STEPS), then scores, 500 samples each, seeds 0 and
# 1, with Inception FID beside its real-vs-real floor, the photo classifier's metrics and saturation:
#   - what `ddpm sample RUN` draws with no flags (the post-hoc default autoguided at g 2.6), DPM-Solver++ 20 and 10
#     steps;
#   - the seed's default: RUN/model (the classic EMA), classifier-free guidance w = 3 at every step, no guide;
#   - the classic EMA guided by the run's half-way snapshot RUN/guide at g 2.6 (the fallback before issue 36).
#   bash benchmarks/colour_measure.sh [RUN [STEPS [TRAIN FLAGS...]]]
# A fresh 2,000-step run: about 20 minutes of training and 25 of evaluation on 2 cores (RESULTS.md, "Colour").
# TRAIN FLAGS replace the preset: e.g. the seed's plain eps objective, as measured in RESULTS.md.
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUN=${1:-runs/photos32}
STEPS=${2:-2000}
shift $(( $# < 2 ? $# : 2 ))
if [ -f "$RUN/latest" ]; then
  $BIN/ddpm train --resume "$RUN" --steps "$STEPS" --quiet
elif [ $# -gt 0 ]; then
  /usr/bin/time -f "training: %e s wall, %U s user" $BIN/ddpm train photos --out "$RUN" --steps "$STEPS" --quiet "$@"
else
  /usr/bin/time -f "training: %e s wall, %U s user" $BIN/ddpm train --preset photos32 --out "$RUN" --steps "$STEPS" \
    --quiet
fi
# one eval/ for every row: the classifier and the real images' features are computed once (samples are kept
# apart by the weights' sha1 and the setting); each command's table is kept in its .txt
OUT="$RUN/colour_step$STEPS"
mkdir -p "$OUT"
for seed in 0 1; do
  $BIN/ddpm eval "$RUN" --n 500 --seed "$seed" --guide-weight 2.6 --sampling-steps 20 10 --out "$OUT" \
    --quiet | tee "$OUT/default_seed$seed.txt"
  $BIN/ddpm eval "$RUN/model" --n 500 --seed "$seed" --guide none --guidance 3 --guidance-interval 0 1 \
    --out "$OUT" --quiet | tee "$OUT/seed_default_seed$seed.txt"
  $BIN/ddpm eval "$RUN/model" --n 500 --seed "$seed" --guide "$RUN/guide" --guide-weight 2.6 \
    --out "$OUT" --quiet | tee "$OUT/classic_guided_seed$seed.txt"
done
$BIN/ddpm sample "$RUN" --per-class 4 --out "$OUT/samples" --quiet
