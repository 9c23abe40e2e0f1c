#!/usr/bin/env bash
# Structured output on the GPU machine: its GPU tests, then bench W3 (W1's prompts constrained to a JSON schema
# against W1 at the same output lengths, async and synchronous steps). Logs go to $OUT.
# llguidance and jsonschema are not in the GPU image: carry their wheels (python 3.12) in .whl, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     llguidance==1.9.1 jsonschema==4.26.0 jsonschema-specifications referencing rpds-py
# Usage there: [LAYERS=40] [REQUESTS=1024] bash scripts/gpu/structured_all.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=.:/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -s tests/gpu/test_structured_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/structured_gpu_tests.log"
timeout ${BENCH_S:-400} python3 -m ziya_batch.tools.bench --workload W3 --layers ${LAYERS:-40} \
    --requests ${REQUESTS:-1024} 2>&1 | tee "$OUT/bench_w3.log"
