#!/bin/bash
#SBATCH --job-name=chemfl-frontier
#SBATCH --account=MyProject
#SBATCH --qos=debug
#SBATCH --nodes=2
#SBATCH --time=02:00:00
#SBATCH --output=chemfl-frontier-%j.out
# ChemFL: 16 Flower SuperNodes for facility frontier (2 nodes x 8, one per GCD),
# each connecting out to the SuperLink at fl.example.org:443 (layout per-gpu).
# Rendered by chemfl.launcher from the facilities file: change that and render again, or edit here.
set -euo pipefail

# --- Job clock, first thing (before the site's modules, which take a while to load): when the job ends
# (epoch seconds), and how long before that the services are stopped, so that they leave the federation
# cleanly instead of being killed mid-message.
# Slurm exports the end; elsewhere (outside a Slurm job) count the walltime from now.
export CHEMFL_JOB_END_TIME=${SLURM_JOB_END_TIME:-$(( $(date +%s) + 7200 ))}  # walltime 02:00:00
export CHEMFL_JOB_ID=${SLURM_JOB_ID:-$$}
export CHEMFL_STOP_MARGIN=120
# A SuperNode refused at activation is retried this long (seconds), every CHEMFL_REFUSED_PAUSE s.
export CHEMFL_REFUSED_RETRY=${CHEMFL_REFUSED_RETRY:-180} CHEMFL_REFUSED_PAUSE=${CHEMFL_REFUSED_PAUSE:-10}
# flower-supernode retries a lost SuperLink forever unless told otherwise: each call gives up after this long.
export CHEMFL_CONNECT_WAIT=${CHEMFL_CONNECT_WAIT:-600}

# --- Site environment (the facility's `setup` lines). Unset variables are allowed meanwhile:
# module and conda scripts read variables that may be unset.
set +u
module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a
source ~/chemfl/.venv/bin/activate
set -u

# --- Outbound proxy: compute nodes reach the SuperLink only through it. The Fleet API is HTTP (httpx),
# which reads https_proxy and no_proxy (grpc_proxy has no effect on it). Local traffic (the SuperNode's
# runtime API on 127.0.0.1) must not go through the proxy: added to any no_proxy the site set.
export http_proxy=http://proxy.ccs.ornl.gov:3128/
export https_proxy=http://proxy.ccs.ornl.gov:3128/
export no_proxy="${no_proxy:+${no_proxy},}localhost,127.0.0.1,::1"

# --- This job's node-local folder (mode 700): FLWR_HOMEs, the services'
# process-group files. Short enough for a Unix socket path (at most 107 bytes) even when TMPDIR is long.
export CHEMFL_RUN_DIR="${TMPDIR:-/tmp}/chemfl-${CHEMFL_JOB_ID}"
(( ${#CHEMFL_RUN_DIR} <= 80 )) || CHEMFL_RUN_DIR="/tmp/chemfl-${CHEMFL_JOB_ID}"
mkdir -p "$CHEMFL_RUN_DIR"
chmod 700 "$CHEMFL_RUN_DIR"
rm -f "$CHEMFL_RUN_DIR"/*.pgid "$CHEMFL_RUN_DIR/stopping"
export MIOPEN_USER_DB_PATH="$CHEMFL_RUN_DIR/miopen"  # hpc.md: OLCF Frontier guide: MIOpen disk errors otherwise
export MIOPEN_CUSTOM_CACHE_DIR="$CHEMFL_RUN_DIR/miopen"  # beside MIOPEN_USER_DB_PATH as OLCF does; not in hpc.md

# --- Stopping. Every service runs under `timeout` (without --foreground), which gives it its own process
# group; the group's id goes to $CHEMFL_RUN_DIR/<service>.pgid. Stopping signals the whole group, so that
# it reaches the SuperNode's SuperExec and ClientApps: TERM, then KILL
# for what is left after CHEMFL_STOP_GRACE s. The groups stay in the job's session, which PBS kills; Slurm
# kills through cgroups.
export CHEMFL_STOP_GRACE=${CHEMFL_STOP_GRACE:-40}
stop_services() {
  local file pgid waited=0
  local pgids=()
  touch "$CHEMFL_RUN_DIR/stopping"  # a SuperNode waiting to retry does not start again
  for file in "$CHEMFL_RUN_DIR"/*.pgid; do
    [[ -e $file ]] || continue
    pgid=$(<"$file")
    if kill -TERM -- "-$pgid" 2> /dev/null; then
      pgids+=("$pgid")
    fi
  done
  for pgid in ${pgids[@]+"${pgids[@]}"}; do
    while kill -0 -- "-$pgid" 2> /dev/null && (( waited < CHEMFL_STOP_GRACE )); do
      sleep 1
      waited=$(( waited + 1 ))
    done
    kill -KILL -- "-$pgid" 2> /dev/null || true
  done
  rm -f "$CHEMFL_RUN_DIR"/*.pgid
}
on_signal() {
  trap - TERM INT HUP
  echo "chemfl: job signalled ($1): stopping its services" >&2
  stop_services
  exit "$2"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP
trap 'stop_services' EXIT

# A watchdog in its own process group: if this script is killed before it can stop its services (SIGKILL to
# its process group), it kills them.
watchdog() {
  local file
  while kill -0 "$1" 2> /dev/null && [[ $(ps -o stat= -p "$1" 2> /dev/null) != Z* ]]; do
    sleep 1
  done
  for file in "$CHEMFL_RUN_DIR"/*.pgid; do
    [[ -e $file ]] && kill -KILL -- "-$(<"$file")" 2> /dev/null
  done
  return 0
}
timeout --signal=KILL $(( CHEMFL_JOB_END_TIME - $(date +%s) + 600 )) \
  bash -c "$(declare -f watchdog); watchdog $$" < /dev/null > /dev/null 2>&1 &

# --- Can this compute node reach the SuperLink? `chemfl launch submit` checked from the login node, which
# may see the network differently; this probe goes the SuperNode's way (https_proxy, no_proxy) and fails
# the job at once, instead of a SuperNode retrying a blocked connection.
export CHEMFL_PROBE_ATTEMPTS=${CHEMFL_PROBE_ATTEMPTS:-3} CHEMFL_PROBE_PAUSE=${CHEMFL_PROBE_PAUSE:-10}
probe_superlink() {
  local attempt
  if ! command -v curl > /dev/null; then
    echo "chemfl: no curl on this node: the SuperLink is not probed before the start" >&2
    return 0
  fi
  for (( attempt = 1; attempt <= CHEMFL_PROBE_ATTEMPTS; attempt++ )); do
    if curl --silent --show-error --output /dev/null --max-time 20 \
      --cacert "$HOME/chemfl/certs/ca.crt" \
      "https://fl.example.org:443/"; then
      echo "chemfl: SuperLink fl.example.org:443 reachable from $(hostname)"
      return 0
    fi
    (( attempt == CHEMFL_PROBE_ATTEMPTS )) || sleep "$CHEMFL_PROBE_PAUSE"
  done
  echo "chemfl: the SuperLink at fl.example.org:443 is not reachable from compute node $(hostname)" \
    "(https_proxy=${https_proxy:-none}) after ${CHEMFL_PROBE_ATTEMPTS} tries: check that it runs, that the proxy" \
    "passes its port (facility proxies may pass only 443) and its certificate (root-certificates); job stopped" >&2
  return 1
}
if ! probe_superlink; then
  exit 1
fi

# --- One SuperNode, in the foreground: index $1 in this job (0..15), GCD $2 on this node.
# srun has already pinned it to its GCD; its own runtime port and FLWR_HOME (node-local) keep it
# apart from the SuperNodes beside it; timeout stops it CHEMFL_STOP_MARGIN s before the job's end; it gives
# up after CHEMFL_CONNECT_WAIT s without the SuperLink.
# The SuperLink refuses a SuperNode ("code: 2004" in its log, Flower exit code 305) whose key is still
# online from an earlier SuperNode that ended uncleanly (a killed job), until that one misses two
# heartbeats (~60 s), and one whose key is not registered: retry for CHEMFL_REFUSED_RETRY s, then give up.
start_supernode() {
  local index=$1 gpu=$2
  local flwr_home="${CHEMFL_RUN_DIR}/supernode-${index}"
  local output="${flwr_home}/supernode.out"  # this attempt's output, also in the job's log
  local seconds_left status refused_since=0
  mkdir -p "$flwr_home" "$MIOPEN_USER_DB_PATH" "$MIOPEN_CUSTOM_CACHE_DIR"
  while true; do
    if [[ -e $CHEMFL_RUN_DIR/stopping ]]; then
      return 0  # the job is stopping its services
    fi
    seconds_left=$(( CHEMFL_JOB_END_TIME - $(date +%s) - CHEMFL_STOP_MARGIN ))
    if (( seconds_left <= 0 )); then
      echo "chemfl: SuperNode ${index} not started: the job ends in under ${CHEMFL_STOP_MARGIN} s" >&2
      return 0  # out of time, not a failure: like a SuperNode stopped on schedule
    fi
    status=0
    (
      export FLWR_HOME="$flwr_home"
      timeout --signal=TERM --kill-after=30 "$seconds_left" \
        flower-supernode \
          --superlink fl.example.org:443 \
          --root-certificates "$HOME/chemfl/certs/ca.crt" \
          --auth-supernode-private-key "$HOME/chemfl/keys/frontier-${index}" \
          --port $(( 9094 + gpu )) \
          --max-wait-time "$CHEMFL_CONNECT_WAIT" \
          --node-config "facility='frontier' data-path='/lustre/orion/MyProject/proj-shared/chemfl/partitions/frontier' data-slice='${index}/16' job-end-time=${CHEMFL_JOB_END_TIME}" \
          < /dev/null &
      pgid=$!  # timeout's process group: the SuperNode and everything it starts
      echo "$pgid" > "${CHEMFL_RUN_DIR}/supernode-${index}.pgid"
      status=0
      wait "$pgid" || status=$?
      # What the SuperNode leaves behind (its SuperExec, ClientApps) goes with it, and lets go of the log pipe.
      kill -TERM -- "-$pgid" 2> /dev/null || true
      for (( waited = 0; waited < 5; waited++ )); do
        kill -0 -- "-$pgid" 2> /dev/null || break
        sleep 1
      done
      kill -KILL -- "-$pgid" 2> /dev/null || true
      exit "$status"
    ) 2>&1 | tee "$output" || status=$?
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

# --- Start: one Slurm task per GCD on every node. --gpus-per-task=1 --gpu-bind=closest gives each
# task its own GCD and the cores next to it; SLURM_PROCID numbers the SuperNodes across the job,
# SLURM_LOCALID within a node. The function travels as text (declare -f); srun passes this
# shell's environment (site setup, proxies, CHEMFL_*) to every task.
status=0
srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest \
  bash -c "set -euo pipefail; $(declare -f start_supernode); start_supernode \"\$SLURM_PROCID\" \"\$SLURM_LOCALID\"" &
wait "$!" || status=$?
exit "$status"
