#!/usr/bin/env bash
# The one prepared GPU check (issue 13). On a machine with one CUDA GPU and no network, from the repo root:
#
#   bash benchmarks/gpu_check.sh            # about 7 minutes; writes $OUT/gpu_check.md (or benchmarks/results/)
#
# It needs nothing downloaded: the package runs from src/ (PYTHONPATH), and the peers' packages come from wheels
# in .whl/ made beforehand on a machine with PyPI (`make gpu-wheels`; the device tool carries the folder).
# Steps: (1) bench_gpu.py: Trainer.step for ours, lucidrains' Unet(dim=64) and diffusers' UNet2DModel, bf16,
# channels_last, eager and compiled, batch 64 and 128; (2) `ddpm prepare` the bundled photos at 64x64 and train the
# seed's 64x64 conditional configuration on it for 3 minutes with CUDA's sync debug mode "error" inside every
# step; (3) `ddpm sample` a grid from it. Everything printed also goes to the results file.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS_DIR="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS_DIR"
RESULTS="$RESULTS_DIR/gpu_check.md"
WORK="$(mktemp -d)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
  echo
  echo "## 1. Training step throughput (bench_gpu.py)"
  timeout 300 "$PY" benchmarks/bench_gpu.py --batches 64 128 --steps 20 --compile no yes --peers || echo "bench_gpu.py: exit $?"
  echo
  echo "## 2. Three minutes of the seed's 64x64 conditional run on a prepared copy of the bundled photos"
  "$PY" -m ddpm prepare photos --conditional --image-size 64 --out "$WORK/photos64" || echo "ddpm prepare: exit $?"
  timeout -s INT 180 "$PY" benchmarks/train_sync_checked.py train "$WORK/photos64" --preset cifar10-64 --steps 1000000 \
    --out "$WORK/run" --checkpoint-every 500 --sample-every 0 --num-workers auto
  status=$?
  echo "train exit status $status (124 = stopped by the 3-minute timeout as planned, the last checkpoint kept; anything else failed)"
  echo
  echo "## 3. A sample grid"
  "$PY" -m ddpm sample "$WORK/run" --out "$WORK/samples" --per-class 4 --sampler dpmpp2m --sampling-steps 20 \
    || echo "ddpm sample: exit $?"
} 2>&1 | tee "$RESULTS"
cp "$WORK/samples/grid.png" "$RESULTS_DIR/gpu_grid.png" 2>/dev/null || true
echo "results: $RESULTS"
