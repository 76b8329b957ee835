# session 38, call 1: the kernel table (decode B1/64/256, prefill with flash and the paged kernel), then offline at
# 1,024 requests, hybrid and rapid 100/100 (adaptive), one machine, the current code
set -u
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
echo "=== kernels $(date +%T)"; mkdir -p $OUT/kernels
timeout 200 python3 bench/kernels.py --skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill --compile-dynamic tokens --out $OUT/kernels 2>&1 | grep "decode \[\|prefill \[\|profile\|Error\|error" | cut -c1-300 | tail -16
echo "=== offline $(date +%T)"; SPLITS1K="hybrid 100/100" NUM_SEQS=1024 timeout 360 bash bench/gpu_session.sh offline1k 2>&1 | tail -8
echo "=== end $(date +%T)"
