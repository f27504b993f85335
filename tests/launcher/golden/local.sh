#!/bin/bash
# ChemFL: 2 Flower SuperNodes for facility local (1 node x 2, one per slot),
# each connecting out to the SuperLink at 127.0.0.1:9092.
# Rendered by chemfl.launcher from the facilities file: change that and render again, or edit here.
set -euo pipefail

# --- Job clock: when the job ends (epoch seconds), and how long before that the SuperNodes are
# stopped, so that they leave the federation cleanly instead of being killed mid-message.
export CHEMFL_JOB_END_TIME=$(( $(date +%s) + 600 ))  # walltime 00:10:00
export CHEMFL_JOB_ID=$$
export CHEMFL_STOP_MARGIN=30

# --- One SuperNode, in the foreground: index $1 in this job (0..1), slot $2 on this node.
# No slot pinning; its own runtime port and FLWR_HOME (node-local) keep it
# apart from the SuperNodes beside it; timeout stops it CHEMFL_STOP_MARGIN s before the job's end.
start_supernode() {
  local index=$1 gpu=$2
  local flwr_home="${TMPDIR:-/tmp}/chemfl-${CHEMFL_JOB_ID}-${index}"
  local seconds_left=$(( CHEMFL_JOB_END_TIME - $(date +%s) - CHEMFL_STOP_MARGIN ))
  if (( seconds_left <= 0 )); then
    echo "chemfl: SuperNode ${index} not started: the job ends in under ${CHEMFL_STOP_MARGIN} s" >&2
    return 1
  fi
  mkdir -p "$flwr_home"
  FLWR_HOME="$flwr_home" timeout --signal=TERM --kill-after=30 "$seconds_left" \
    flower-supernode \
      --superlink 127.0.0.1:9092 \
      --insecure \
      --port $(( 9094 + gpu )) \
      --node-config "facility='local' data-path='/work/partitions/local' data-slice='${index}/2' job-end-time=${CHEMFL_JOB_END_TIME}" \
    || [[ $? -eq 124 ]]  # 124: timeout stopped it on schedule
}

# --- One node's SuperNodes, each in the background; node $1 runs indices $1*2 .. $1*2+1.
start_node() {
  local node=$1 gpu
  for gpu in {0..1}; do
    start_supernode $(( node * 2 + gpu )) "$gpu" &
  done
  wait
}

start_node 0
