# session 37, call 3: every GPU test with the attention kernels as programmatic dependents (the engine's default now),
# then offline hybrid at 1,024 requests
set -u
echo "=== tests $(date +%T)"; timeout 330 bash bench/gpu_session.sh tests 2>&1 | tail -6
echo "=== offline $(date +%T)"; SPLITS1K=hybrid NUM_SEQS=1024 timeout 175 bash bench/gpu_session.sh offline1k 2>&1 | tail -4
echo "=== end $(date +%T)"
