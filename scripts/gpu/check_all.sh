#!/usr/bin/env bash
# One call on the GPU machine that checks the GPU code paths: every GPU test, then short 13B-shape runs of the new
# engine paths (FP8 weights with the float8 KV cache against float16; W2 with prefix caching on and off).
# Missing Python packages travel as wheels in .whl/ (carry it). Logs go to $OUT. Usage there:
#   [TESTS_S=200] [REQUESTS=1024] [BENCH_S=110] [W2_REQUESTS=512] bash scripts/gpu/check_all.sh
set -o pipefail
. "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton, pydantic; print(torch.__version__, transformers.__version__, triton.__version__, pydantic.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${TESTS_S:-200} python3 -m pytest -q -rfE tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
R=${REQUESTS:-1024}
timeout ${BENCH_S:-110} python3 -m ziya_batch.tools.bench --requests $R --only engine,roofline 2>&1 | tee "$OUT/bench_f16.log" | grep "^\[bench\]"
timeout ${BENCH_S:-110} python3 -m ziya_batch.tools.bench --requests $R --only engine,roofline --quantization fp8 --kv-cache-dtype fp8 2>&1 | tee "$OUT/bench_w8kv8.log" | grep "^\[bench\]"
timeout ${W2_S:-130} python3 -m ziya_batch.tools.bench --requests ${W2_REQUESTS:-512} --workload W2 --prefix-caching both 2>&1 | tee "$OUT/bench_w2.log" | grep "^\[bench\]"
