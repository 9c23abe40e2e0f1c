#!/usr/bin/env bash
# Issue 23 on one GPU, in stages of one call each (STAGE=tests|f16|fp8|stack|gemm, several space-separated):
#   tests  every GPU test (about 250 s on one H100)
#   onemachine  tests/gpu/test_one_machine_gpu.py alone, its failure printed whole
#   f16    W1 (1,024 requests) float16: the engine with mixed-step graphs on, then off, and transformers'
#          continuous batching, in one bench run
#   fp8    W1 with FP8 weights and the float8 KV cache: mixed-step graphs on, then off
#   f16on, fp8on  the same with mixed-step graphs on only, without the baseline
#   stack  W1 through Redis, Ray and one worker (bench_stack.py --configs 1x1) on random 13B-shape weights
#   quality  the FP8 quality gate on a trained 13B-shape model (fp8_quality.py; on an H100 its 40 layers train
#          with AdamW stepped inside the backward pass, peak 73 GiB; the schedule anneals by --train-max-s
#          where that comes before --steps, e.g. QUALITY_ARGS="--steps 2000 --train-max-s 450", which trains and generates within one 590 s call; a call the limit
#          stops in generation leaves the checkpoint in /tmp/quality for the next call on that machine;
#          QUALITY_ARGS="--layers 20 --steps 600 --train-max-s 190" for the 20-layer run of earlier sessions)
#   seats  W1 in one bench run: float16, then FP8 weights + FP8 KV at 256, 384 and 512 seats (bench --also)
#   w1all  W1 in one bench run with the baseline: float16, FP8 weights + FP8 KV (at $FP8_SEATS seats, default
#          the engine's; FP8_FAST=1 adds a row with engine.fp8_fast_accum), and transformers' continuous
#          batching; EXTRA_ALSO: more rows, space-separated --also variants. Set ZIYA_BATCH_COMMIT: the machine's
#          own checkout names another commit
#   fp8tests  the FP8 and piecewise GPU tests and the one-machine test
#   gemm   the four projections at decode row counts under cuBLAS, cuBLASLt and TunableOp
#   kernels  the engine, FP8 and piecewise GPU tests (test_engine_gpu.py checks every decode-attention
#          configuration on float16 and float8 caches)
#   attn   every decode-attention configuration on W1-like batches, float16 and float8 caches, against the floor
#   ncuattn  Nsight Compute on one decode-attention launch over the float8 cache, 224 W1-like contexts
#          (NCU_CONFIG, default 64,2,3,fma,heads): throughput, memory, occupancy, warp stalls
#   prof   where W1's steps spend their GPU time (profile_steps.py; PROF_ARGS, default FP8 weights + FP8 KV with
#          fast accumulation)
#   buckets  one layer's projections at every graph size (decode batch sizes, mixed-step buckets), float16 and FP8
#          with fast accumulation, and the sizes the runner drops (bucket_times.py)
#   stepab  the runner's and scheduler's step choices on and off (decode rows longest context first, steps cut
#          back to a bucket, the decode-attention kernel, the admission order), alternated on one engine per
#          configuration (step_ab.py; AB_PLAN, default the cut with FP8 + FP8 KV + fast accumulation x4, float16 x2)
#   probe  a float16 GEMM beside a memory-bound copy at several SM carveouts (carveout_probe.py)
#   smread  how much bandwidth a persistent reader gets from N SMs (plain loads, tensor descriptors), alone and
#          beside cuBLASLt GEMMs leaving it those SMs (sm_reader_probe.py)
#   tgemm  FP8 projections: torch._scaled_mm against a Triton kernel autotuned per shape (fp8_gemm_triton.py)
#   tunable  FP8 projections through _scaled_mm with PyTorch's TunableOp on (fp8_gemm_accum.py --tunable)
# Ray, redis and the spec's packages come from .gpuwhl-b/install.sh (run beforehand: /tmp/site, /tmp/redis).
# Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} PYTHONPATH=/tmp/site:. PATH=/tmp/redis/usr/bin:$PATH
export LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
for st in ${STAGE:-tests f16}; do
  case $st in
    tests) timeout ${TESTS_S:-320} python3 -m pytest -q -rfE tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    onemachine) timeout ${ONE_S:-200} python3 -m pytest -x -rfE tests/gpu/test_one_machine_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/one_machine.log" | tail -60 ;;
    f16) timeout ${F16_S:-330} python3 -m ziya_batch.tools.bench --only engine,roofline,hf-continuous --mixed-graphs both 2>&1 | tee "$OUT/bench_f16.log" | grep '^\[bench\]' ;;
    f16on) timeout ${F16_S:-130} python3 -m ziya_batch.tools.bench --only engine,roofline 2>&1 | tee "$OUT/bench_f16on.log" | grep '^\[bench\]' ;;
    fp8on) timeout ${FP8_S:-130} python3 -m ziya_batch.tools.bench --only engine,roofline --quantization fp8 --kv-cache-dtype fp8 2>&1 | tee "$OUT/bench_fp8on.log" | grep '^\[bench\]' ;;
    fp8) timeout ${FP8_S:-230} python3 -m ziya_batch.tools.bench --only engine,roofline --quantization fp8 --kv-cache-dtype fp8 --mixed-graphs both 2>&1 | tee "$OUT/bench_fp8.log" | grep '^\[bench\]' ;;
    stack) timeout ${STACK_S:-330} python3 scripts/gpu/bench_stack.py --work /tmp/stack --out "$OUT" --configs 1x1 --skip-parity 2>&1 | tee "$OUT/stack.log" | grep '^\[stack\]' ;;
    quality) timeout ${QUALITY_S:-590} python3 scripts/gpu/fp8_quality.py --work /tmp/quality --out "$OUT" ${QUALITY_ARGS:-} 2>&1 | grep -v 'Writing model' | tee "$OUT/quality.log" | tail -12 ;;
    seats) timeout ${SEATS_S:-420} python3 -m ziya_batch.tools.bench --only engine,roofline --also quantization=fp8,kv-cache-dtype=fp8 --also quantization=fp8,kv-cache-dtype=fp8,max-num-seqs=384 --also quantization=fp8,kv-cache-dtype=fp8,max-num-seqs=512 2>&1 | tee "$OUT/bench_seats.log" | grep '^\[bench\]' ;;
    w1all) timeout ${W1_S:-480} python3 -m ziya_batch.tools.bench --only engine,roofline,hf-continuous --also quantization=fp8,kv-cache-dtype=fp8${FP8_SEATS:+,max-num-seqs=$FP8_SEATS} ${FP8_FAST:+--also quantization=fp8,kv-cache-dtype=fp8,fp8-fast-accum=on} $(for v in ${EXTRA_ALSO:-}; do printf -- '--also %s ' "$v"; done) --markdown "$OUT/BENCH.md" 2>&1 | tee "$OUT/bench_w1all.log" | grep '^\[bench\]' ;;
    fp8tests) timeout ${TESTS_S:-240} python3 -m pytest -q -rfE tests/gpu/test_fp8_gpu.py tests/gpu/test_piecewise_gpu.py tests/gpu/test_one_machine_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/fp8_tests.log" | tail -40 ;;
    kernels) timeout ${TESTS_S:-300} python3 -m pytest -q -rfE tests/gpu/test_engine_gpu.py tests/gpu/test_fp8_gpu.py tests/gpu/test_piecewise_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/kernel_tests.log" | tail -30 ;;
    attn) timeout ${ATTN_S:-320} python3 scripts/gpu/decode_kernel_variants.py --kv float16,fp8 2>&1 | tee "$OUT/attn.log" ;;
    ncuattn) timeout ${NCU_S:-240} ncu --clock-control none --kernel-name regex:_paged_decode --launch-skip 30 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats python3 scripts/gpu/decode_kernel_variants.py --kv fp8 --config ${NCU_CONFIG:-64,2,3,fma,heads} --cases "224 mixed" 2>&1 | tee "$OUT/ncu_attn.log" | tail -120 ;;
    prof) timeout ${PROF_S:-300} python3 scripts/gpu/profile_steps.py ${PROF_ARGS:---quantization fp8 --kv-cache-dtype fp8 --fp8-fast-accum} 2>&1 | tee "$OUT/profile_steps.log" | tail -90 ;;
    buckets) timeout ${BUCKETS_S:-120} python3 scripts/gpu/bucket_times.py --fast-accum 2>&1 | tee "$OUT/bucket_times.log" | tail -12 ;;
    stepab) timeout ${AB_S:-560} python3 scripts/gpu/step_ab.py ${AB_PLAN:+--plan $AB_PLAN} 2>&1 | tee "$OUT/step_ab.log" | grep -v '^\[' | tail -20 ;;
    probe) timeout ${PROBE_S:-80} python3 scripts/gpu/carveout_probe.py 2>&1 | tee "$OUT/probe.log" ;;
    smread) timeout ${SMREAD_S:-150} python3 scripts/gpu/sm_reader_probe.py 2>&1 | tee "$OUT/sm_reader.log" ;;
    tgemm) timeout ${TGEMM_S:-200} python3 scripts/gpu/fp8_gemm_triton.py 2>&1 | tee "$OUT/tgemm.log" ;;
    tunable) timeout ${TUNABLE_S:-120} python3 scripts/gpu/fp8_gemm_accum.py --tunable --rows 128,224,768 2>&1 | tee "$OUT/tunable.log" ;;
    gemm) timeout ${GEMM_S:-90} python3 scripts/gpu/gemm_blas.py --rows 64,128,192,256 --libs cublas,cublaslt,tunable 2>&1 | tee "$OUT/gemm.log" ;;
  esac
done
