# session 39, call 2: the engine's GPU tests on the session's final engine code (hybrid's Ctrl-C hold, /health on a
# stopped worker, a worker's bad-input error raised as such, generate_stream's eager checks, lora/priority keywords)
set -u
echo "=== tests $(date +%T)"; timeout 330 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu_rapid.py tests/test_gpu_memory.py > $OUT/gpu-tests.log 2>&1; tail -12 $OUT/gpu-tests.log
echo "=== attention $(date +%T)"; timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py > $OUT/gpu-attention.log 2>&1; tail -4 $OUT/gpu-attention.log
echo "=== end $(date +%T)"
