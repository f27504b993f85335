#!/bin/bash
#PBS -N chemfl-aurora
#PBS -A MyProject
#PBS -q capacity
#PBS -l select=2
#PBS -l place=scatter
#PBS -l walltime=06:00:00
#PBS -l filesystems=home:flare
#PBS -m n
#PBS -j oe
# ChemFL: 24 Flower SuperNodes for facility aurora (2 nodes x 12, one per GPU tile),
# each connecting out to the SuperLink at fl.example.org:443 (layout per-gpu).
# Rendered by chemfl.launcher from the facilities file: change that and render again, or edit here.
set -euo pipefail

# --- Job clock, first thing (before the site's modules, which take a while to load): when the job ends
# (epoch seconds), and how long before that the services are stopped, so that they leave the federation
# cleanly instead of being killed mid-message.
# PBS does not export the end: count the walltime from now, when the script starts.
export CHEMFL_JOB_END_TIME=$(( $(date +%s) + 21600 ))  # walltime 06:00:00
CHEMFL_JOB_ID=${PBS_JOBID:-$$}
export CHEMFL_JOB_ID=${CHEMFL_JOB_ID%%.*}  # 123456.<pbs server> -> 123456
export CHEMFL_STOP_MARGIN=120
# A SuperNode refused at activation is retried this long (seconds), every CHEMFL_REFUSED_PAUSE s.
export CHEMFL_REFUSED_RETRY=${CHEMFL_REFUSED_RETRY:-180} CHEMFL_REFUSED_PAUSE=${CHEMFL_REFUSED_PAUSE:-10}
# flower-supernode retries a lost SuperLink forever unless told otherwise: each call gives up after this long.
export CHEMFL_CONNECT_WAIT=${CHEMFL_CONNECT_WAIT:-600}

# --- Site environment (the facility's `setup` lines). Unset variables are allowed meanwhile:
# module and conda scripts read variables that may be unset.
set +u
module load frameworks
source ~/chemfl/.venv/bin/activate
set -u

# --- Outbound proxy: compute nodes reach the SuperLink only through it. The Fleet API is HTTP (httpx),
# which reads https_proxy and no_proxy (grpc_proxy has no effect on it). Local traffic (the SuperNode's
# runtime API on 127.0.0.1) must not go through the proxy: added to any no_proxy the site set.
export http_proxy=http://proxy.alcf.anl.gov:3128
export https_proxy=http://proxy.alcf.anl.gov:3128
export no_proxy="${no_proxy:+${no_proxy},}localhost,127.0.0.1,::1"
export ZE_FLAT_DEVICE_HIERARCHY=FLAT  # one device per tile, so ZE_AFFINITY_MASK=i picks tile i

# --- This job's node-local folder (mode 700): FLWR_HOMEs, the services'
# process-group files. Short enough for a Unix socket path (at most 107 bytes) even when TMPDIR is long.
export CHEMFL_RUN_DIR="${TMPDIR:-/tmp}/chemfl-${CHEMFL_JOB_ID}"
(( ${#CHEMFL_RUN_DIR} <= 80 )) || CHEMFL_RUN_DIR="/tmp/chemfl-${CHEMFL_JOB_ID}"
mkdir -p "$CHEMFL_RUN_DIR"
chmod 700 "$CHEMFL_RUN_DIR"
rm -f "$CHEMFL_RUN_DIR"/*.pgid "$CHEMFL_RUN_DIR/stopping"

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

# --- One SuperNode, in the foreground: index $1 in this job (0..23), GPU tile $2 on this node.
# ZE_AFFINITY_MASK pins it to that GPU tile; its own runtime port and FLWR_HOME (node-local) keep it
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
  mkdir -p "$flwr_home"
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
      export ZE_AFFINITY_MASK="$gpu"
      timeout --signal=TERM --kill-after=30 "$seconds_left" \
        flower-supernode \
          --superlink fl.example.org:443 \
          --root-certificates "$HOME/chemfl/certs/ca.crt" \
          --auth-supernode-private-key "$HOME/chemfl/keys/aurora-${index}" \
          --port $(( 9094 + gpu )) \
          --max-wait-time "$CHEMFL_CONNECT_WAIT" \
          --node-config "facility='aurora' data-path='/lus/flare/projects/MyProject/chemfl/partitions/aurora' data-slice='${index}/24' job-end-time=${CHEMFL_JOB_END_TIME}" \
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

# --- One node's SuperNodes, each in the background; node $1 runs indices $1*12 .. $1*12+11.
# The node fails (and so the job) if any of its SuperNodes failed (crashed, or refused for good).
start_node() {
  local node=$1 gpu pid failed=0
  local pids=()
  for gpu in {0..11}; do
    start_supernode $(( node * 12 + gpu )) "$gpu" &
    pids+=("$!")
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
  done
  return "$failed"
}

status=0
# --- Start: every node runs start_node. mpiexec starts one rank per node, numbered by PALS_NODEID
# (PMI_RANK elsewhere), unbound (--cpu-bind none) so that the node's SuperNodes share all its cores;
# --envall passes this shell's environment (site setup, proxies, CHEMFL_*) to every rank. The functions
# travel as text (declare -f).
mpiexec -n 2 --ppn 1 --cpu-bind none --envall \
  bash -c "set -euo pipefail; $(declare -f start_supernode start_node); start_node \"\${PALS_NODEID:-\$PMI_RANK}\"" &
wait "$!" || status=$?
exit "$status"
