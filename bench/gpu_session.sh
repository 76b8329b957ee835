#!/usr/bin/env bash
# One device call: install carried wheels, run the GPU tests, then the engine-level GPU benchmarks.
#   bash bench/gpu_session.sh STAGE...   (stages: tests frontier-hybrid frontier-rapid offline offline1k graph-buckets
#                                          gemm gemv splitk prefetch paged-sweep sampler step-profile kernels
#                                          serve (= serve-sharegpt-like) serve-3k http
#                                          mps-partition host-overhead mps-priority pack)
# pack (last): everything in $OUT but commit.txt into one results.tgz, since the device tool returns at most 8 files
# and none deeper than two folders (session 25 lost a step profile to that).
set -uo pipefail
python3 -c "import msgspec, zmq, gguf, fastapi, uvicorn" 2>/dev/null || [ -d /tmp/site/msgspec ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
MODEL=${MODEL:-/tmp/llama8b}  # SHAPE=tiny MODEL=/tmp/tiny-dry: a CPU dry run of a stage's commands
python3 bench/make_model_folder.py ${SHAPE:-llama-3.1-8b} $MODEL >/dev/null
BATCHES=${BATCHES:-16,64}
# Steady-state serving (rapid bench serve): every mode in MODES on the same fresh-per-rate traces, DURATION s of
# Poisson arrivals per rate (gamma with shape BURST when set), warm-up excluded, queues left after DRAIN s aborted.
# 3 rates x 50 s x 2 modes plus start-up and drains fits one ~8-minute call (an engine's start, warm-up and close
# took about 35 s in session 15); serve.json + serve.md (+ plots) land in $OUT/serve-TAG-MODES.
serve_steady() {  # serve_steady TAG RATES DATASET-FLAGS...
  local tag=$1 rates=$2 m=${MODES:-hybrid,rapid}; shift 2; m=${m//[,:\/=]/-}
  python3 -m rapid.entrypoints.cli bench serve --model $MODEL --load-format dummy --skip-tokenizer-init \
    --max-model-len 4096 --max-num-batched-tokens ${TOKENS:-2048} --prefill-sm-percentage ${PREFILL_PCT:-100} \
    --decode-sm-percentage ${DECODE_PCT:-100} --modes ${MODES:-hybrid,rapid} "$@" --request-rates $rates \
    --duration-s ${DURATION:-50} ${WARMUP:+--warmup-s $WARMUP} --drain-timeout-s ${DRAIN:-20} \
    --goodput ttft:1000 tpot:50 --slo-pairs ${SLO_PAIRS:-1000/50,500/25,2000/100} --seed ${SEED:-0} \
    ${BURST:+--burstiness $BURST} --result-dir $OUT/serve-$tag-${m}${TAG:-} 2>&1 | tr '\r' '\n' | grep --line-buffered -v "it/s\]"
  cat $OUT/serve-$tag-${m}${TAG:-}/serve.md 2>/dev/null | grep -v "^Command:"
  rm -f $OUT/serve-$tag-${m}${TAG:-}/*.png  # the device tool returns few files: bench/replot.py draws them from serve.json
}
# HTTP overhead (issue 13): the same steady-state trace at HTTP_RATE req/s, once through `rapid serve`'s OpenAI endpoint
# (rapid bench serve --backend openai) and once in process; http-openai/ and http-inproc/ land in $OUT.
http_vs_inproc() {
  python3 -c "import fastapi, uvicorn, prometheus_client" || { echo "http: the HTTP stack does not import (bash bench/fetch_wheels.sh)"; return 1; }
  local common="--model $MODEL --max-model-len 4096 --dataset-name sharegpt-like --max-tokens-cap ${CAP:-512}
    --request-rates ${HTTP_RATE:-32} --duration-s ${DURATION:-40} --warmup-s ${WARMUP:-10} --drain-timeout-s ${DRAIN:-15}
    --goodput ttft:1000 tpot:50 --slo-pairs ${SLO_PAIRS:-1000/50,500/25,300/15} --seed ${SEED:-0}"
  python3 -m rapid.entrypoints.cli serve --model $MODEL --load-format dummy --skip-tokenizer-init \
    --max-model-len 4096 --mode ${HTTP_MODE:-hybrid} --port 8000 --no-zmq > $OUT/http-serve.log 2>&1 &
  local pid=$!
  python3 -c "import httpx, os, sys, time
def alive(pid):  # a server that exited stays a zombie of this shell until waited for: read its state
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False
for _ in range(300):  # until healthy; give up at once if the server died (session 12 waited 10 minutes on it)
    if not alive($pid): sys.exit('rapid serve exited before it became healthy')
    try:
        if httpx.get('http://127.0.0.1:8000/health', timeout=2).status_code == 200: break
    except httpx.HTTPError: pass
    time.sleep(1)
else: sys.exit('rapid serve never became healthy')" || { tail -30 $OUT/http-serve.log; kill $pid; return 1; }
  python3 -m rapid.entrypoints.cli bench serve --backend openai --base-url http://127.0.0.1:8000 \
    --modes ${HTTP_MODE:-hybrid} $common --result-dir $OUT/http-openai 2>&1 | tr '\r' '\n' | grep -v "it/s\]"
  python3 -c "import httpx; print(httpx.get('http://127.0.0.1:8000/metrics').text)" > $OUT/http-metrics.txt
  kill -TERM $pid; wait $pid
  python3 -m rapid.entrypoints.cli bench serve --backend inproc --modes ${HTTP_MODE:-hybrid} --load-format dummy \
    --skip-tokenizer-init $common --result-dir $OUT/http-inproc 2>&1 | tr '\r' '\n' | grep -v "it/s\]"
  for d in http-openai http-inproc; do echo "--- $d"; grep -v "^Command:" $OUT/$d/serve.md; done
}
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_gpu_rapid.py tests/test_gpu_memory.py tests/test_gpu_attention.py tests/test_gemv.py \
      --deselect tests/test_gemv.py::test_gemv_equals_torch_under_the_interpreter > $OUT/gpu-tests.log 2>&1; tail -30 $OUT/gpu-tests.log ;;
    frontier-hybrid) python3 -m rapid.entrypoints.cli --log-level INFO bench frontier --model $MODEL --mode hybrid \
        --load-format dummy --chunks ${CHUNKS:-256,512,1024,2048,4096} --batches $BATCHES --ctx 1024 \
        --prefill-len 2048 --window-s ${WINDOW:-2} --max-model-len 4096 --output-json $OUT/frontier-hybrid.json 2>&1 | grep --line-buffered -v "it/s" ;;
    frontier-rapid) python3 -m rapid.entrypoints.cli --log-level INFO bench frontier --model $MODEL --mode rapid \
        --load-format dummy --splits ${SPLITS:-50/50,60/40,70/30,80/40,100/100} --batches $BATCHES --ctx 1024 \
        --prefill-len 2048 --window-s ${WINDOW:-2} --max-model-len 4096 --output-json $OUT/frontier-rapid.json 2>&1 | grep --line-buffered -v "it/s" ;;
    serve|serve-sharegpt-like) serve_steady sharegpt-like ${RATES:-8,16,24} --dataset-name sharegpt-like --max-tokens-cap ${CAP:-512} ;;
    http) http_vs_inproc ;;
    serve-3k) serve_steady random3k ${RATES:-2,4,6} --dataset-name random --random-input-len 3000 --random-output-len 300 --ignore-eos ;;
    graph-buckets) python3 bench/graph_buckets.py --model $MODEL --decodes ${DECODES:-0,128} --out $OUT 2>&1 | grep -v "it/s" | tail -6 ;;
    gemm) python3 bench/gemm_shapes.py ${GEMM_AUTOTUNE:+--autotune} ${GEMM_BATCHES:+--batches $GEMM_BATCHES} --out $OUT 2>&1 | grep -v "^ \|AUTOTUNE" | tail -16 ;;
    paged-sweep) python3 bench/paged_prefill_sweep.py --out $OUT 2>&1 | tail -9 ;;
    gemv) python3 bench/gemv_sweep.py --out $OUT 2>&1 | tail -16 ;;
    prefetch) python3 bench/weight_prefetch_probe.py --batch ${PREFETCH_BATCH:-64} --out $OUT 2>&1 | tail -8 ;;
    splitk) python3 bench/splitk_gemm_sweep.py --batches ${SPLITK_BATCHES:-64,16,32,128} --out $OUT 2>&1 | tail -40 ;;
    sampler) python3 bench/sampler_cost.py --out $OUT 2>&1 | tail -12 ;;
    mps-partition) bash bench/mps_partition_probe.sh 2>&1 | tail -60 ;;
    mps-priority) python3 bench/mps_priority_frontier.py --model $MODEL --splits ${SPLITS:-100/100,60/100} --batches $BATCHES \
        --priorities ${PRIORITIES:-0,1} --window-s ${WINDOW:-2} --out $OUT 2>&1 | grep --line-buffered -v "it/s" | tail -12 ;;
    host-overhead) python3 bench/host_overhead.py --model $MODEL --configs ${HCONFIGS:-hybrid:async,rapid:async} \
        --batches ${PBATCHES:-1,64,256} --output-json $OUT/host-overhead.json 2>&1 | grep -v "it/s" | tail -12 ;;
    step-profile) python3 bench/step_profile.py --model $MODEL --batches ${PBATCHES:-1,64,256} --ctx ${CTX:-1000} --out $OUT 2>&1 \
        | grep -v "it/s" > $OUT/step-profile.log; grep -v "^ " $OUT/step-profile.log | tail -5 ;;
    kernels) python3 bench/kernels.py --skip ${KSKIP:-attention} --compile-dynamic ${KDYN:-tokens} ${KARGS:-} --out $OUT 2>&1 | grep -v "it/s" | tail -40 ;;
    offline1k) for split in ${SPLITS1K:-hybrid 70/30 100/100}; do
        if [ $split = hybrid ]; then m="--mode hybrid"; tag=hybrid; else m="--mode rapid --prefill-sm-percentage ${split%/*} --decode-sm-percentage ${split#*/}"; tag=rapid-${split%/*}-${split#*/}; fi
        python3 -m rapid.entrypoints.cli bench offline --model $MODEL $m --load-format dummy --skip-tokenizer-init \
          --max-model-len 4096 --num-seqs ${NUM_SEQS:-256} --min-input-len 1000 --max-input-len 1000 --min-output-len 1000 \
          --max-output-len 1000 ${OFFLINE_EXTRA:-} --output-json $OUT/offline1k-$tag${TAG:-}.json 2>&1 | grep --line-buffered -v "it/s" | tail -3; done ;;
    pack) (cd $OUT && find . -mindepth 1 -maxdepth 1 ! -name commit.txt ! -name results.tgz -printf '%P\0' \
        | tar czf results.tgz --null -T - --remove-files) && ls -la $OUT ;;
    offline) for mode in ${OFFLINE_MODES:-hybrid rapid}; do python3 -m rapid.entrypoints.cli bench offline --model $MODEL --mode $mode \
        --load-format dummy --skip-tokenizer-init --max-model-len 4096 --num-seqs ${NUM_SEQS:-256} --output-json $OUT/offline-$mode.json 2>&1 | grep --line-buffered -v "it/s" | tail -5; done ;;
  esac
done
