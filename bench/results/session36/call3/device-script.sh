# session 36, call 3: float8 tests; the decode kernel swept over a float8 pool (float16 and bf16 dots), then the decode steps with the best
set -u
mkdir -p $OUT/fp8
echo "=== tests $(date +%T)"; timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py -k "float8 or rope" > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
echo "=== fp8 sweep $(date +%T)"; timeout 400 python3 bench/kernels.py --skip eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only --kv-cache-dtype fp8 --sweep --apply-best --attention-shapes 1x1024,64x1024,256x2048 --out $OUT/fp8 2>&1 | grep "attention B\|decode \[\|profile\|Error\|error" | cut -c1-600 | tail -16
echo "=== end $(date +%T)"
