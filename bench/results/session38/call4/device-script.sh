# session 38, call 4: the engine's GPU tests after LLM.generate moved onto the DeltaRouter (tests/test_gpu_rapid.py),
# then offline hybrid at 1,024 requests through LLM.generate on the same code
set -u
echo "=== tests $(date +%T)"; timeout 300 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu_rapid.py > $OUT/gpu-tests.log 2>&1; tail -8 $OUT/gpu-tests.log
echo "=== offline $(date +%T)"; SPLITS1K=hybrid NUM_SEQS=1024 timeout 190 bash bench/gpu_session.sh offline1k 2>&1 | tail -5
echo "=== end $(date +%T)"
