#!/usr/bin/env bash
# Issue 36 item 1: the colour benchmark, the quickstart's counterpart on the bundled photos (RGB, one class per
# source photo, 32x32): train the photos32 preset (about 2,000 steps), then score what `ddpm sample RUN` draws with
# no flags against the seed's default (the classic EMA, classifier-free guidance w = 3 at every step), 500 samples,
# seeds 0 and 1, with Inception FID and its real-vs-real floor, the photo classifier's metrics and saturation.
#   bash benchmarks/colour_measure.sh [RUN]        (about 15 minutes of training and 15 of evaluation on 2 cores)
set -euo pipefail
BIN=${BIN:-.venv/bin}
RUN=${1:-runs/photos32}
if [ ! -f "$RUN/model/model.safetensors" ]; then
  if [ -f "$RUN/latest" ]; then $BIN/ddpm train --resume "$RUN" --quiet; else
    /usr/bin/time -f "training: %e s wall, %U s user" $BIN/ddpm train --preset photos32 --out "$RUN" --quiet; fi
fi
for seed in 0 1; do
  # what `ddpm sample RUN` draws: the post-hoc default, autoguided at g 2.6 (one row: --guide-weight)
  $BIN/ddpm eval "$RUN" --n 500 --seed "$seed" --guide-weight 2.6 --out "$RUN/eval_default" --quiet \
    | tee "$RUN/colour_default_seed$seed.txt"
  # the seed's default: RUN/model (the classic EMA), CFG w = 3 at every step, no guide
  $BIN/ddpm eval "$RUN/model" --n 500 --seed "$seed" --guide none --guidance 3 --guidance-interval 0 1 \
    --out "$RUN/eval_seed" --quiet | tee "$RUN/colour_seed_default_seed$seed.txt"
done
$BIN/ddpm sample "$RUN" --per-class 4 --out "$RUN/samples" --quiet
