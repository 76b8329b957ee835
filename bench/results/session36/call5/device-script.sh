# session 36, call 5: float8 tests; the paged prefill kernel over float8 (float16 / bf16 dots) and bf16 pools; offline hybrid fp8 again
set -u
echo "=== tests $(date +%T)"; timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py -k "float8 or paged" > $OUT/gpu-tests.log 2>&1; tail -3 $OUT/gpu-tests.log
echo "=== prefill $(date +%T)"; mkdir -p $OUT/pp-fp8 $OUT/pp-bf16
timeout 60 python3 bench/paged_prefill_sweep.py --default-only --kv-cache-dtype fp8 --out $OUT/pp-fp8 2>&1 | grep "every row" | cut -c1-900
timeout 60 python3 bench/paged_prefill_sweep.py --default-only --out $OUT/pp-bf16 2>&1 | grep "every row" | cut -c1-500
echo "=== offline $(date +%T)"; SPLITS1K=hybrid NUM_SEQS=1024 TAG=-fp8 OFFLINE_EXTRA="--kv-cache-dtype fp8" timeout 175 bash bench/gpu_session.sh offline1k
echo "=== end $(date +%T)"
