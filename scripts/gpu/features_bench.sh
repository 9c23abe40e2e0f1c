#!/usr/bin/env bash
# One call on the GPU machine for the feature benchmarks, each against its own baseline in the same process:
# the structured-output GPU tests, W3 against W1 at the same output lengths (async and synchronous steps), the
# logprobs modes and top-5 logprobs on W1, W1 with prefix caching on and off, and W2g on and off.
# Missing Python packages travel as wheels in .whl/ (carry it). Logs go to $OUT. About 9 minutes. Usage there:
#   ZIYA_BATCH_COMMIT=<sha> [REQUESTS=256] bash scripts/gpu/features_bench.sh
set -o pipefail
. "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader | tee "$OUT/gpu.txt"
R=${REQUESTS:-256}
bench() { local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m ziya_batch.tools.bench "$@" 2>&1 | tee "$OUT/bench_$name.log" | grep "^\[bench\] [^ ]" | grep -v "^\[bench\]  "; }
timeout 80 python3 -m pytest -q -rfE tests/gpu/test_structured_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
bench w3 140 --workload W3 --requests $R
bench logprobs 150 --only engine --requests $R --logprobs processed,temperature,temperature+top5
bench w1prefix 80 --workload W1 --prefix-caching both --requests $R
bench w2g 80 --workload W2g --prefix-caching both --requests $((2 * R))
