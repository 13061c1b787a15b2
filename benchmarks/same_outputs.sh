#!/usr/bin/env bash
# Before/after check of a refactor: `ddpm sample`, `ddpm edit` and `ddpm eval` on one tiny run, drawn by the code
# at REV (a git worktree) and by the working tree, must write the same bytes and the same one-line errors.
#   bash benchmarks/same_outputs.sh REV
set -euo pipefail
REV=${1:?give the revision to compare with}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$WORK/tree" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git -C "$ROOT" worktree add --detach "$WORK/tree" "$REV" >/dev/null 2>&1
TINY="--image-size 8 --base-channels 8 --channel-mults 1,2 --bottleneck-mult 2 --batch-size 8 --sample-every 0 --quiet"
PYTHONPATH=$ROOT/src $PY -m ddpm train mnist --conditional --out "$WORK/run" --steps 40 --val-every 0 $TINY
# training too: the same run trained by REV's code must export the same weights, EMA and snapshots
PYTHONPATH=$WORK/tree/src $PY -m ddpm train mnist --conditional --out "$WORK/run_before" --steps 40 --val-every 0 $TINY
train_status=0
for f in model/model.safetensors guide/model.safetensors $(cd "$WORK/run" && ls ema_snapshots/*); do
  cmp -s "$WORK/run/$f" "$WORK/run_before/$f" || { echo "training differs: $f"; train_status=1; }
done
[ $train_status = 0 ] && echo "training: model/, guide/ and $(ls "$WORK/run/ema_snapshots" | wc -l) snapshots equal"
for side in before after; do
  src=$([ $side = before ] && echo "$WORK/tree/src" || echo "$ROOT/src")
  out=$WORK/$side; mkdir -p "$out"
  run() { PYTHONPATH=$src $PY -m ddpm "$@" 2>>"$out/stderr.txt" >>"$out/stdout.txt" || echo "exit $?" >>"$out/stderr.txt"; }
  run sample "$WORK/run" --out "$out/default" --n 6 --sampling-steps 4 --device cpu --quiet
  run sample "$WORK/run/model" --out "$out/classic" --n 6 --sampler ddim --sampling-steps 4 --guidance 2 --device cpu --quiet
  run sample "$WORK/run" --out "$out/rebuilt" --n 4 --ema-length 0.08 --guide-ema-length 0.15 --sampling-steps 3 --device cpu --quiet
  run edit "$WORK/run" "$WORK/run/model" --strength 0.5 --out "$out/bad_images" --device cpu --quiet
  run edit "$WORK/run" "$out/default" --strength 0.5 --out "$out/img2img" --sampling-steps 4 --labels 3 --device cpu --quiet
  run edit "$WORK/run" --interpolate 3 --seeds 1 2 --out "$out/interp" --sampling-steps 4 --labels 1 --device cpu --quiet
  run eval "$WORK/run" --n 6 --ref-n 8 --no-fid --classifier-steps 5 --sampling-steps 2 --out "$out/eval" --device cpu --quiet
  run sample "$WORK/run" --out "$out/bad" --guide-weight 2 --guide none --n 2 --quiet
  run sample "$WORK/run" --out "$out/bad2" --ema-step 3 --n 2 --quiet
done
cd "$WORK"
status=0
for f in $(cd before && find . -type f -name '*.png' | sort); do
  cmp -s "before/$f" "after/$f" || { echo "differs: $f"; status=1; }
done
[ "$(cd before && find . -name '*.png' | wc -l)" = "$(cd after && find . -name '*.png' | wc -l)" ] || { echo "PNG counts differ"; status=1; }
python3 - "$WORK" <<'PY' || status=1
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
a, b = (json.loads((w / s / "eval" / "eval" / "eval.json").read_text()) for s in ("before", "after"))
def keep(row):  # the output folders differ by name (before/, after/); timings differ by nature
    return {k: (v.replace(f"{w}/before", "OUT").replace(f"{w}/after", "OUT") if isinstance(v, str) else v)
            for k, v in row.items() if "seconds" not in k and k not in ("created", "time")}
rows_a, rows_b = [keep(r) for r in a["rows"]], [keep(r) for r in b["rows"]]
print("eval rows equal:", rows_a == rows_b)
for ra, rb in zip(rows_a, rows_b):
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k) != rb.get(k):
            print("  differs:", k, ra.get(k), rb.get(k))
sys.exit(0 if rows_a == rows_b else 1)
PY
diff <(sed "s#$WORK/before#X#g; s#$WORK/after#X#g" before/stderr.txt) <(sed "s#$WORK/before#X#g; s#$WORK/after#X#g" after/stderr.txt) && echo "stderr equal" || status=1
echo "PNG files compared: $(cd before && find . -name '*.png' | wc -l)"
exit $((status | train_status))
