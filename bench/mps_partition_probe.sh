#!/usr/bin/env bash
# Does this machine's MPS offer static SM partitioning (`nvidia-cuda-mps-control -S`, documented from CUDA 13.1's
# MPS), which gives a client SMs of its own, where CUDA_MPS_ACTIVE_THREAD_PERCENTAGE only caps how many it may use
# (issue 15: under the percentage, rapid's prefill and decode workers mostly take turns on the H200)?
# Prints the control daemon's and the driver's versions, what the man page says of partitions, and what a private
# daemon started with -S answers to partition commands; then stops that daemon and removes its folders. No engine
# runs and no GPU setting is changed.
#   OUT=/tmp/out bash bench/mps_partition_probe.sh      (writes $OUT/mps-partition-probe.log)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
command -v nvidia-cuda-mps-control >/dev/null || { echo "no nvidia-cuda-mps-control on this machine"; exit 1; }
dir=$(mktemp -d /tmp/rapid-mps-probe-XXXXXX)
export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
ask() { echo "--- '$1'"; echo "$1" | timeout 10 nvidia-cuda-mps-control 2>&1; echo "(rc $?)"; }
{
  echo "--- versions"; nvidia-cuda-mps-control -v 2>&1
  nvidia-smi --query-gpu=name,driver_version,uuid --format=csv,noheader
  echo "--- the man page on partitions"; man nvidia-cuda-mps-control 2>/dev/null | grep -i -B1 -A4 "partition" | head -80
  echo "--- a private daemon with static partitioning"; nvidia-cuda-mps-control -d -S 2>&1; echo "(rc $?)"; sleep 1
  for c in "lspart" "sm_partition list" "help"; do ask "$c"; done
  uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
  ask "sm_partition add $uuid 4"
  ask "lspart"
  echo quit | timeout 10 nvidia-cuda-mps-control; sleep 1
  echo "--- its control log"; tail -40 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
} 2>&1 | tee "$OUT/mps-partition-probe.log"
rm -rf "$dir"
