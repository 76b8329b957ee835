# session 36, call 4: decode steps bf16 vs float8 pools with the engine's defaults (one machine), then offline hybrid fp8 vs bf16
set -u
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only"
mkdir -p $OUT/fp8 $OUT/bf16
echo "=== fp8 $(date +%T)"; timeout 100 python3 bench/kernels.py $KV --kv-cache-dtype fp8 --out $OUT/fp8 2>&1 | grep "decode \[\|profile\|Error\|error" | cut -c1-300 | tail -8
echo "=== bf16 $(date +%T)"; timeout 100 python3 bench/kernels.py $KV --out $OUT/bf16 2>&1 | grep "decode \[\|profile\|Error\|error" | cut -c1-300 | tail -8
echo "=== offline $(date +%T)"; SPLITS1K=hybrid NUM_SEQS=1024 TAG=-fp8 OFFLINE_EXTRA="--kv-cache-dtype fp8" timeout 175 bash bench/gpu_session.sh offline1k
SPLITS1K=hybrid NUM_SEQS=1024 timeout 175 bash bench/gpu_session.sh offline1k
echo "=== end $(date +%T)"
