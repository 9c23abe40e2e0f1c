#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, a 4-layer smoke bench (through `ziya-batch bench`, which hands its
# arguments to tools/bench.py), then the full W1 bench. Logs go to $OUT.
# Usage there: ZIYA_BATCH_COMMIT=<sha> [SMOKE=0] [FULL_ARGS="--only engine,roofline"] bash scripts/gpu/engine_all.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
[ "${SMOKE:-1}" = 0 ] || timeout 60 python3 -m ziya_batch.cli bench --layers 4 --requests 64 --only engine,roofline 2>&1 | tee "$OUT/smoke.log"
timeout ${FULL_S:-380} python3 -m ziya_batch.tools.bench ${FULL_ARGS:-} --markdown "$OUT/BENCHMARKS.md" 2>&1 | tee "$OUT/bench.log"
