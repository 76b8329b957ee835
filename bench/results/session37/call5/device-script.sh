# session 37, call 5 (the machine of calls 3-4, warm): the kernel benchmark with prefill, on 1f29b7a (PDL on)
export PYTHONPATH=/tmp/site:$PWD; mkdir -p $OUT/kernels
timeout 400 python3 bench/kernels.py --skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill --compile-dynamic tokens --out $OUT/kernels
