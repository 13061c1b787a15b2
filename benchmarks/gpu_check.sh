#!/usr/bin/env bash
# The one prepared GPU check (issues 13 and 18). On a machine with one CUDA GPU and no network, from the repo root:
#
#   bash benchmarks/gpu_check.sh      # at most about 7 minutes: every part has its own time cap (416 s)
#
# Results: $OUT/gpu_check.md (everything printed), $OUT/gpu_check.json and $OUT/gpu_check_tables.md (the rows and
# issue 18's targets), $OUT/gpu.jsonl (raw rows), $OUT/gpu_grid.png. Without $OUT: benchmarks/results/.
# It needs nothing downloaded: the package runs from src/ (PYTHONPATH), and the peers' packages come from wheels in
# .whl/ made beforehand on a machine with PyPI (`make gpu-wheels`; the device tool carries the folder).
# A part that reaches its cap is cut there; the rows it finished are kept and the report says what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/gpu_check.md"
ROWS="$RESULTS_DIR/gpu.jsonl"
rm -f "$ROWS"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"  # a cold compile cache: the compile times a first run pays
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
# BENCH_EXTRA="--device cpu --tiny --steps 2" checks this script on a CPU (the GPU-only parts then fail fast).
bench() {  # bench CAP_SECONDS PART ARGS...: one part of bench_gpu.py under its time cap
  local cap=$1; shift
  # shellcheck disable=SC2086
  timeout -k 5 "$cap" "$PY" benchmarks/bench_gpu.py "$@" ${BENCH_EXTRA:-} --jsonl "$ROWS" \
    || echo "bench_gpu.py $*: exit $? (124: cut at its ${cap}s cap)"
}

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
  echo
  echo "## 1. Training step, eager and CUDA-graphed: the seed's batch 14 (10 classes), then 64, 128, 256"
  bench 20 train --modes eager graphs --batches 14 --classes 10
  bench 25 train --modes eager graphs --batches 128 64 256
  echo "## 2. Graphed against eager: the same weights after 8 steps?"
  bench 10 equal --modes eager graphs --batches 64 --steps 8
  echo
  # Meanwhile the compiles run with an empty cache (the first-step target; only their time to the first fast step
  # counts, beside other GPU work) and fill the cache that part 5's timed rows then find.
  ( timeout -k 5 95 "$PY" benchmarks/bench_gpu.py train --cold --modes compile+graphs --batches 128 --steps 2 \
      --no-flops ${BENCH_EXTRA:-} --jsonl "$ROWS"
    timeout -k 5 30 "$PY" benchmarks/bench_gpu.py train --cold --modes compile+graphs --batches 14 --classes 10 \
      --steps 2 --no-flops ${BENCH_EXTRA:-} --jsonl "$ROWS" ) > "$WORK/cold.log" 2>&1 &
  cold=$!
  echo "## 3. 90 seconds of the seed's 64x64 conditional run with CUDA graphs, no host sync allowed in any step"
  timeout 15 "$PY" -m ddpm prepare photos --conditional --image-size 64 --out "$WORK/photos64" || echo "ddpm prepare: exit $?"
  timeout -s INT 90 "$PY" benchmarks/train_sync_checked.py train "$WORK/photos64" --preset cifar10-64 --steps 1000000 \
    --out "$WORK/run" --checkpoint-every 500 --sample-every 0 --num-workers auto --cuda-graphs on
  status=$?
  echo "train exit status $status (124 = stopped by the 90-second timeout as planned, the last checkpoint kept; anything else failed)"
  echo
  echo "## 4. A sample grid"
  timeout 15 "$PY" -m ddpm sample "$WORK/run" --out "$WORK/samples" --per-class 4 --sampler dpmpp2m --sampling-steps 20 \
    || echo "ddpm sample: exit $?"
  echo "## 4b. Distillation of that 64x64 run: 20 steps of one round (8 -> 4 DDIM steps, bf16), then its student"
  timeout 30 "$PY" -m ddpm distill "$WORK/run" --steps 4 --start-steps 8 --round-steps 20 --batch-size 14 \
    --out "$WORK/distilled" || echo "ddpm distill: exit $? (124: cut at its 30s cap)"
  timeout 10 "$PY" -m ddpm sample "$WORK/distilled/steps_4" --out "$WORK/student" --per-class 2 \
    || echo "ddpm sample of the student: exit $?"
  echo
  wait "$cold"
  echo "## 5. Compiled, with and without CUDA graphs, batch 128 and the seed's batch 14 (the compiles with an empty cache"
  echo "ran beside part 3:)"
  grep -h '"part": "cold"' "$WORK/cold.log" || tail -3 "$WORK/cold.log"
  bench 60 train --modes compile+graphs compile --batches 128
  bench 25 train --modes compile+graphs compile --batches 14 --classes 10 --no-flops
  echo "## 6. The peers compiled at batch 128 (empty cache), each under its own cap"
  bench 38 train --net lucidrains --modes compile --batches 128
  bench 38 train --net diffusers --modes compile --batches 128
  echo "## 7. Kernels: GroupNorm in NCHW and channels_last, SDPA backends at 32x32"
  bench 15 kernels --batches 128 --steps 10
  echo "## 8. Sampling one batch, eager and as one CUDA graph of the sampler loop"
  bench 20 sample --batches 16 64
  echo
  "$PY" benchmarks/bench_gpu.py report --jsonl "$ROWS" --out "$RESULTS_DIR"
} 2>&1 | tee "$RESULTS"
cp "$WORK/samples/grid.png" "$RESULTS_DIR/gpu_grid.png" 2>/dev/null || true
echo "results: $RESULTS"
