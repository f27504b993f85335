#!/bin/bash
#PBS -N chemfl-polaris
#PBS -A MyProject
#PBS -q debug
#PBS -l select=1:system=polaris
#PBS -l place=scatter
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:eagle
#PBS -j oe
# ChemFL: 4 Flower SuperNodes for facility polaris (1 node x 4, one per GPU),
# each connecting out to the SuperLink at fl.example.org:443.
# Rendered by chemfl.launcher from the facilities file: change that and render again, or edit here.
set -euo pipefail

# --- Site environment (the facility's `setup` lines). Unset variables are allowed meanwhile:
# module and conda scripts read variables that may be unset.
set +u
module use /soft/modulefiles
module load conda
source ~/chemfl/.venv/bin/activate
set -u

# --- Outbound proxy: compute nodes reach the SuperLink only through it. Each SuperNode's own runtime
# API (127.0.0.1) must not go through it.
export http_proxy=http://proxy.alcf.anl.gov:3128
export https_proxy=http://proxy.alcf.anl.gov:3128
export grpc_proxy=http://proxy.alcf.anl.gov:3128
export no_proxy=localhost,127.0.0.1
export no_grpc_proxy=localhost,127.0.0.1,::1

# --- Job clock: when the job ends (epoch seconds), and how long before that the SuperNodes are
# stopped, so that they leave the federation cleanly instead of being killed mid-message.
# PBS does not export the end: count the walltime from now, when the script starts.
export CHEMFL_JOB_END_TIME=$(( $(date +%s) + 3600 ))  # walltime 01:00:00
CHEMFL_JOB_ID=${PBS_JOBID:-$$}
export CHEMFL_JOB_ID=${CHEMFL_JOB_ID%%.*}  # 123456.<pbs server> -> 123456
export CHEMFL_STOP_MARGIN=120
# A SuperNode refused at activation is retried this long (seconds), every CHEMFL_REFUSED_PAUSE s.
export CHEMFL_REFUSED_RETRY=${CHEMFL_REFUSED_RETRY:-180} CHEMFL_REFUSED_PAUSE=${CHEMFL_REFUSED_PAUSE:-10}

# --- One SuperNode, in the foreground: index $1 in this job (0..3), GPU $2 on this node.
# CUDA_VISIBLE_DEVICES pins it to that GPU; its own runtime port and FLWR_HOME (node-local) keep it
# apart from the SuperNodes beside it; timeout stops it CHEMFL_STOP_MARGIN s before the job's end
# (--foreground keeps it in the job's process group, so that killing the job's group reaches the SuperNode).
# The SuperLink refuses a SuperNode ("code: 2004" in its log, Flower exit code 305) whose key is still
# online from an earlier SuperNode that ended uncleanly (a killed job), until that one misses two
# heartbeats (~60 s), and one whose key is not registered: retry for CHEMFL_REFUSED_RETRY s, then give up.
start_supernode() {
  local index=$1 gpu=$2
  local flwr_home="${TMPDIR:-/tmp}/chemfl-${CHEMFL_JOB_ID}-${index}"
  local output="${flwr_home}/supernode.out"  # this attempt's output, also in the job's log
  local seconds_left status refused_since=0
  mkdir -p "$flwr_home"
  while true; do
    seconds_left=$(( CHEMFL_JOB_END_TIME - $(date +%s) - CHEMFL_STOP_MARGIN ))
    if (( seconds_left <= 0 )); then
      echo "chemfl: SuperNode ${index} not started: the job ends in under ${CHEMFL_STOP_MARGIN} s" >&2
      return 0  # out of time, not a failure: like a SuperNode stopped on schedule
    fi
    status=0
    FLWR_HOME="$flwr_home" CUDA_VISIBLE_DEVICES="$gpu" timeout --signal=TERM --kill-after=30 --foreground "$seconds_left" \
      flower-supernode \
        --superlink fl.example.org:443 \
        --root-certificates "$HOME/chemfl/certs/ca.crt" \
        --auth-supernode-private-key "$HOME/chemfl/keys/polaris-${index}" \
        --port $(( 9094 + gpu )) \
        --node-config "facility='polaris' data-path='/eagle/MyProject/chemfl/partitions/polaris' data-slice='${index}/4' job-end-time=${CHEMFL_JOB_END_TIME}" \
      2>&1 | tee "$output" || status=$?
    if (( status == 0 || status == 124 )); then  # 124: timeout stopped it on schedule
      return 0
    fi
    if grep -q "code: 2004" "$output"; then
      (( refused_since > 0 )) || refused_since=$(date +%s)
      if (( $(date +%s) - refused_since < CHEMFL_REFUSED_RETRY )); then
        echo "chemfl: SuperNode ${index} refused by the SuperLink; retrying in ${CHEMFL_REFUSED_PAUSE} s" >&2
        sleep "$CHEMFL_REFUSED_PAUSE"
        continue
      fi
      echo "chemfl: SuperNode ${index} refused for ${CHEMFL_REFUSED_RETRY} s; is its key registered? (chemfl launch register)" >&2
    fi
    return "$status"
  done
}

# --- One node's SuperNodes, each in the background; node $1 runs indices $1*4 .. $1*4+3.
# The node fails (and so the job) if any of its SuperNodes failed (crashed, or refused for good).
start_node() {
  local node=$1 gpu pid failed=0
  local pids=()
  for gpu in {0..3}; do
    start_supernode $(( node * 4 + gpu )) "$gpu" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  return "$failed"
}

start_node 0
