# session 39, call 1: the engine's GPU tests (tests/test_gpu_rapid.py, test_gpu_memory.py) on the current code, with
# hybrid's Ctrl-C held until a step ends (rapid/engine/interrupts.py), then host time per step at batch 1, 64, 256
set -u
echo "=== tests $(date +%T)"; timeout 330 python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu_rapid.py tests/test_gpu_memory.py > $OUT/gpu-tests.log 2>&1; tail -12 $OUT/gpu-tests.log
echo "=== host $(date +%T)"; timeout 200 bash bench/gpu_session.sh host-overhead 2>&1 | tail -12
echo "=== end $(date +%T)"
