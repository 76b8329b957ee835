# session 37, call 1: the decode/prefill GEMMs by backend: cuBLASLt, split-K by hand (eager and compiled), TunableOp,
# Inductor max-autotune
set -u
mkdir -p $OUT/split $OUT/at64 $OUT/at256 $OUT/at2048
echo "=== split $(date +%T)"; timeout 150 python3 bench/gemm_shapes.py --batches 64,128,256 --backends cublas,cublaslt,splitk2,splitk4,c-splitk2,tunable --out $OUT/split 2>&1 | grep -v "^ \|AUTOTUNE" | cut -c1-400 | tail -80
for b in 64 256 2048; do
echo "=== autotune $b $(date +%T)"; timeout 130 python3 bench/gemm_shapes.py --batches $b --backends cublaslt,autotune --gemms qkv,o,gate_up,down --out $OUT/at$b 2>&1 | grep -v "^ \|AUTOTUNE\|SingleProcess\|select_algorithm" | cut -c1-300 | tail -12
done
echo "=== end $(date +%T)"
