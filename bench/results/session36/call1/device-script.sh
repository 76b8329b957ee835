# session 36, call 1: float8 KV on the GPU: its tests (and the attention tests again), then decode steps bf16 vs fp8
set -u
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only"
mkdir -p $OUT/bf16 $OUT/fp8
echo "=== tests $(date +%T)"; timeout 260 python3 -m pytest -q -p no:cacheprovider --durations=8 tests/test_gpu_attention.py tests/test_gpu_rapid.py -k "float8 or rope or decode or mixed or prefill" > $OUT/gpu-tests.log 2>&1; tail -6 $OUT/gpu-tests.log
echo "=== fp8 $(date +%T)"; timeout 110 python3 bench/kernels.py $KV --kv-cache-dtype fp8 --out $OUT/fp8 2>&1 | grep "decode \[\|profile\|Error\|error" | tail -8
echo "=== bf16 $(date +%T)"; timeout 110 python3 bench/kernels.py $KV --out $OUT/bf16 2>&1 | grep "decode \[\|profile\|Error\|error" | tail -8
echo "=== end $(date +%T)"
