#!/usr/bin/env bash
# Does CUDA MPS slow one process's step graphs on this GPU? The same whole-graph steps (bench/graph_buckets.py: decode
# rows plus a prompt chunk) timed with CUDA events in one process: without MPS; as an MPS client with rapid's thread
# percentage (100); as one without a percentage; and with 100 beside a second, idle MPS client (rapid's prefill worker
# while no prompt runs there). On the H200 in session 24, rapid's decode worker with every prompt in its own steps ran
# its mixed steps 13% longer under MPS than without (placement mixed, 44 req/s).
#   OUT=/tmp/out MODEL=/tmp/llama8b bash bench/mps_cost.sh     (after bench/gpu_session.sh has made the model folder)
# EAGER=1: the same steps without graphs (their compiled pieces launched one by one), to tell a cost of graphs under MPS
# from one of every kernel; VARIANTS: which of the four runs (default all), e.g. VARIANTS="no-mps mps-100".
# PROBE=1: chains of 1-512 small kernels instead of the model's steps (bench/mps_launch_probe.py), then one table.
# KERNELS=1: with the model's steps, each one's kernels by family (graph_buckets.py --profile).
# PROFILE=1: the engine's decode steps at batch 1, 64 and 256, kernel by kernel (bench/step_profile.py, hybrid).
set -uo pipefail
MODEL=${MODEL:-/tmp/llama8b}; OUT=${OUT:-/tmp/out}
ARGS="--model $MODEL --decodes ${DECODES:-0,96} --ctx ${CTX:-1024} --sizes ${SIZES:-112,288,480} --reps ${REPS:-50}
  --max-tokens 2048 ${EAGER:+--eager} ${KERNELS:+--profile}"
VARIANTS=${VARIANTS:-no-mps mps-100 mps-unset mps-100-beside-idle-client}
run() {  # run NAME [VAR=VALUE...]: one graph_buckets run with these variables set, if VARIANTS names it
  local name=$1; shift
  [[ " $VARIANTS " == *" $name "* ]] || return 0
  echo "--- $name${EAGER:+ (eager)}${PROBE:+ (launch probe)}${PROFILE:+ (step profile)}"
  if [ -n "${PROFILE:-}" ]; then
    mkdir -p $OUT/step-profile/$name
    env "$@" python3 bench/step_profile.py --model $MODEL --batches ${PBATCHES:-1,64,256} --ctx ${CTX:-1000} \
      --out $OUT/step-profile/$name > $OUT/step-profile/$name/log 2>&1; grep -E "rror" $OUT/step-profile/$name/log
    rm -f $OUT/step-profile/$name/trace-*.json.gz  # the device tool returns few files; the JSON has the families
  elif [ -n "${PROBE:-}" ]; then
    env "$@" python3 bench/mps_launch_probe.py --out $OUT/launch-probe/$name 2>&1 | grep -E "^launch|rror"
  else
    env "$@" python3 bench/graph_buckets.py $ARGS --out $OUT/mps-cost/$name${EAGER:+-eager} 2>&1 \
      | grep -E "^decodes|rror" | head -5
  fi
}
# the baseline must not join a daemon that already runs (a CUDA process joins the one at its pipe by itself)
[ -e "${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}/control" ] && { echo "an MPS daemon runs: stop it first"; exit 1; }
run no-mps
[[ " $VARIANTS" == *" mps-"* ]] || exit 0
pipe=$(mktemp -d /tmp/mps-cost-pipe.XXXX); log=$(mktemp -d /tmp/mps-cost-log.XXXX); idle=
cleanup() {  # also when the call's time limit stops the script
  [ -n "$idle" ] && kill $idle 2>/dev/null
  echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe nvidia-cuda-mps-control 2>/dev/null
  sleep 2; rm -rf $pipe $log
  [ -n "${PROBE:-}" ] && python3 bench/mps_launch_probe.py --summarize $OUT/launch-probe
}
trap cleanup EXIT
export CUDA_MPS_PIPE_DIRECTORY=$pipe CUDA_MPS_LOG_DIRECTORY=$log
nvidia-cuda-mps-control -d || { echo "no MPS daemon"; exit 1; }
run mps-100 CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100
run mps-unset
[[ " $VARIANTS " == *" mps-100-beside-idle-client "* ]] || exit 0
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100 python3 -c "import time, torch; torch.ones(1, device='cuda'); time.sleep(900)" &
idle=$!
sleep 5
run mps-100-beside-idle-client CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100
kill $idle; wait $idle 2>/dev/null; idle=
