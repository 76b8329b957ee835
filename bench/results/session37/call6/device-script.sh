# session 37, call 6 (the machine of calls 3-5, warm): decode steps with and without PDL, twice each, on 1f29b7a
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only"
for r in 1 2; do for p in --no-pdl --pdl; do mkdir -p $OUT/r$r$p; timeout 100 python3 bench/kernels.py $KV $p --out $OUT/r$r$p; done; done
