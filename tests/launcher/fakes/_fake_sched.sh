# Shared by the fake PBS/Slurm commands. Job state lives in $FAKE_SCHED_DIR:
#   next_id       the last job number handed out
#   jobs/<id>     the job's state: a PBS letter (Q R F ...) or a Slurm word (PENDING RUNNING ...)
#   jobs/<id>.used, jobs/<id>.exit   PBS resources_used.walltime and Exit_status, when a test sets them
#   jobs/<id>.depend   the dependency it was submitted with (qsub -W depend=..., sbatch --dependency=...)
#   calls.log     one line per call: "<cwd><TAB><command> <args>"
# FAKE_SCHED_FAIL=qsub,qstat,... makes those commands fail the way a rejected request does.
set -euo pipefail
: "${FAKE_SCHED_DIR:?FAKE_SCHED_DIR must name the fake scheduler state directory}"
mkdir -p "$FAKE_SCHED_DIR/jobs"

fake_call() {
  printf '%s\t%s\n' "$PWD" "$*" >>"$FAKE_SCHED_DIR/calls.log"
  if [[ ",${FAKE_SCHED_FAIL:-}," == *",$1,"* ]]; then
    echo "$1: request rejected by the fake scheduler (FAKE_SCHED_FAIL)" >&2
    exit 1
  fi
}

fake_next_id() {
  local last=1000
  [[ -f "$FAKE_SCHED_DIR/next_id" ]] && last="$(cat "$FAKE_SCHED_DIR/next_id")"
  echo $((last + 1)) >"$FAKE_SCHED_DIR/next_id"
  echo $((last + 1))
}

fake_state() {  # prints the job's state; fails for a job the scheduler does not know
  [[ -f "$FAKE_SCHED_DIR/jobs/$1" ]] && cat "$FAKE_SCHED_DIR/jobs/$1"
}

fake_set_state() {
  echo "$2" >"$FAKE_SCHED_DIR/jobs/$1"
}
