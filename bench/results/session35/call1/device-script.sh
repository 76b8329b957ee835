# session 35, call 1: kernels.py A/B (this commit vs a05c543) in one call, then the GPU attention + engine tests
set -u
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens"
mkdir -p /tmp/base $OUT/new $OUT/base $OUT/new2 && tar xzf .device/base-a05c543.tgz -C /tmp/base
echo "=== new $(date +%T)"; timeout 170 python3 bench/kernels.py $KV --out $OUT/new 2>&1 | grep -v "it/s" | grep "decode \[\|prefill \[\|profile\|Error\|error" | tail -14
echo "=== base $(date +%T)"; (cd /tmp/base && PYTHONPATH=/tmp/site:/tmp/base timeout 120 python3 bench/kernels.py $KV --out $OUT/base 2>&1 | grep -v "it/s" | grep "decode \[\|prefill \[\|profile\|Error\|error" | tail -10)
echo "=== new2 $(date +%T)"; timeout 100 python3 bench/kernels.py $KV --skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill,compiled-reduce-kernel-decode --decode-only --out $OUT/new2 2>&1 | grep "decode \[" | tail -4
echo "=== tests $(date +%T)"; timeout 200 python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu_attention.py tests/test_gpu_rapid.py > $OUT/gpu-tests.log 2>&1; tail -4 $OUT/gpu-tests.log
echo "=== end $(date +%T)"
