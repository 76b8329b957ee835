# session 38, call 2: steady-state serving, hybrid and rapid (adaptive, MPS 100/100) on the same ShareGPT-like traces
# at 44 and 58 req/s, then host time per step at batch 1, 64, 256 (hybrid and rapid's decode worker)
set -u
echo "=== serve $(date +%T)"; RATES=44,58 DURATION=40 WARMUP=5 DRAIN=15 SEED=0 timeout 380 bash bench/gpu_session.sh serve 2>&1 | grep -v "^\[W\|Warning" | tail -14
echo "=== host $(date +%T)"; timeout 170 bash bench/gpu_session.sh host-overhead 2>&1 | tail -12
echo "=== end $(date +%T)"
