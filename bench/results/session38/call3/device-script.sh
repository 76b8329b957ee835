# session 38, call 3: hybrid's device busy/idle per decode step at batch 1, 64, 256 (bench/step_profile.py), then
# the engine's GPU tests (tests/test_gpu_rapid.py, test_gpu_memory.py) on the current code
set -u
echo "=== step-profile $(date +%T)"; timeout 170 bash bench/gpu_session.sh step-profile 2>&1 | tail -8
echo "=== tests $(date +%T)"; timeout 330 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu_rapid.py tests/test_gpu_memory.py > $OUT/gpu-tests.log 2>&1; tail -12 $OUT/gpu-tests.log
echo "=== end $(date +%T)"
