# session 37, call 2: programmatic dependent launch (PDL) for the attention kernels, then also Inductor's kernels
set -u
python3 -c "import torch, triton, torch._inductor.config as c; print(torch.__version__, triton.__version__, 'inductor enable_pdl:', getattr(c.triton, 'enable_pdl', 'none'))"
echo "=== tests $(date +%T)"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py -k "programmatic or graph_matches" > $OUT/gpu-tests-pdl.log 2>&1; tail -4 $OUT/gpu-tests-pdl.log
KV="--skip attention,eager,compiled-cublas-decode,compiled-cudnn-prefill,compiled-paged-prefill --compile-dynamic tokens --decode-only"
run() {  # run NAME [kernels.py flags] (env set by the caller)
  local name=$1; shift; mkdir -p $OUT/$name
  echo "=== $name $(date +%T)"; TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$name timeout 110 python3 bench/kernels.py $KV "$@" --out $OUT/$name 2>&1 | grep "decode \[\|profile\|Error\|error" | cut -c1-260 | tail -8
}
run base
run pdl --pdl
TORCHINDUCTOR_ENABLE_PDL=1 run pdl-inductor --pdl
TORCHINDUCTOR_ENABLE_PDL=1 run inductor-only
run base2
TORCHINDUCTOR_ENABLE_PDL=1 run pdl-inductor-fp8 --pdl --kv-cache-dtype fp8
echo "=== end $(date +%T)"
