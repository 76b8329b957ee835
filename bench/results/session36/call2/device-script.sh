# session 36, call 2: the float8 tests again (the bf16 store fixed), decode steps with a float8 pool, offline hybrid fp8 vs bf16
set -u
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only"
mkdir -p $OUT/fp8
echo "=== tests $(date +%T)"; timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py -k "float8 or rope" > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
echo "=== fp8 $(date +%T)"; timeout 100 python3 bench/kernels.py $KV --kv-cache-dtype fp8 --out $OUT/fp8 2>&1 | grep "decode \[\|profile\|Error\|error" | tail -8
echo "=== offline $(date +%T)"; SPLITS1K=hybrid NUM_SEQS=1024 TAG=-fp8 OFFLINE_EXTRA="--kv-cache-dtype fp8" timeout 175 bash bench/gpu_session.sh offline1k
SPLITS1K=hybrid NUM_SEQS=1024 timeout 175 bash bench/gpu_session.sh offline1k
echo "=== end $(date +%T)"
