"""Batch schedulers behind one interface: submit a script, ask a job's state, cancel it.

`PbsScheduler` (qsub/qstat/qdel), `SlurmScheduler` (sbatch/squeue/scancel) and `LocalScheduler`
(a plain `bash script` process, for laptops and tests) share `submit(script, after=None) -> job id`
(`after`: a job id the new job waits for, PBS `-W depend=afterany:<id>`, Slurm
`--dependency=afterany:<id>`; the local scheduler has no queue and refuses it),
`state(job id) -> "queued" | "running" | "ended"`, `cancel(job id)` and `exit_code(job id)`.
`JobTarget` is one facility's job as the watcher sees it, and `Backend` the watcher's view of
anything that runs one (`SchedulerBackend` here, `chemfl.launcher.globus.GlobusBackend`).

The CLI schedulers run on the facility's login node: submission runs in the script's directory,
so the scheduler's default output files and $PBS_O_WORKDIR / $SLURM_SUBMIT_DIR are that directory.
A query that fails for another reason than "no such job" raises ChemFLError rather than reporting
the job ended: a flaky qstat must never make the watcher submit a second copy of a live job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from chemfl.errors import ChemFLError
from chemfl.hpc.commands import require_on_path, run_command
from chemfl.hpc.walltime import parse_pbs_attributes

JobState = Literal["queued", "running", "ended"]


@dataclass(frozen=True)
class JobTarget:
    """One facility's job, as the watcher sees it."""

    facility: str
    scheduler: str  # "pbs" | "slurm" | "local"
    backend: str  # "cli" | "globus"
    script: Path  # the rendered batch script (cli/local)
    body: str  # the script minus directives (what a Globus ShellFunction runs)
    walltime_seconds: int
    max_resubmits: int
    resubmit_backoff_seconds: float
    globus_endpoint: str = ""
    globus_config: dict = field(default_factory=dict)
    resubmit_note: str = ""  # why this facility's jobs are never resubmitted (max_resubmits 0), for the log
    queue_ahead: str = ""  # "" | "dependency" | "early": submit the next job while the current one runs


class Backend(Protocol):
    """What the watcher needs from whatever runs a facility's job."""

    def check(self, target: JobTarget) -> None:
        """Raise ChemFLError if `target` cannot be submitted here (before anything is submitted)."""

    def submit(self, target: JobTarget, after: str | None = None) -> str:
        """Start `target`'s job (held until job `after` has ended, when given); returns its job id."""

    def state(self, job_id: str) -> JobState: ...

    def end_details(self, job_id: str) -> dict:
        """What is known about how an ended job ended (exit code, error), for the event log."""

    def cancel(self, job_id: str) -> str:
        """Stop the job if possible; returns a note for the event log ("" when there is nothing to say)."""

    def close(self) -> None:
        """Release connections and threads; submitted jobs keep running."""


class Scheduler(Protocol):
    submit_command: str

    def submit(self, script: Path, after: str | None = None) -> str: ...

    def state(self, job_id: str) -> JobState: ...

    def cancel(self, job_id: str) -> None: ...

    def exit_code(self, job_id: str) -> int | None: ...


def command_failure(argv: list[str], result: subprocess.CompletedProcess[str]) -> ChemFLError:
    stderr = result.stderr.strip() or result.stdout.strip() or "(no output)"
    return ChemFLError(f"`{' '.join(argv)}` failed with exit code {result.returncode}: {stderr}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def submit_script(argv: list[str], script: Path) -> str:
    """Run a submit command from the script's folder; the job id is its last output line."""
    result = run_command(argv, cwd=script.parent)
    job_id = last_line(result.stdout)
    if result.returncode != 0 or not job_id:
        raise command_failure(argv, result)
    return job_id


# --- PBS Pro ---------------------------------------------------------------------------------------

PBS_QUEUED = frozenset("QHWTM")  # queued, held, waiting for its start time, in transit, moved
PBS_RUNNING = frozenset("RSUB")  # running, suspended, suspended by keyboard activity, array begun
PBS_ENDED = frozenset("EFX")  # exiting (the payload has stopped), finished, subjob finished
# qstat/qdel say one of these when the server no longer holds the job: it has ended.
PBS_GONE = ("Unknown Job Id", "Job has finished")


def pbs_job_state(attributes: dict[str, str]) -> JobState:
    letter = attributes.get("job_state", "")
    if letter in PBS_QUEUED:
        return "queued"
    if letter in PBS_RUNNING:
        return "running"
    if letter in PBS_ENDED:
        return "ended"
    raise ChemFLError(f"qstat reported an unknown job_state {letter!r}")


@dataclass
class PbsScheduler:
    """PBS Pro: `qsub script` prints the job id (123.polaris-pbs-01...)."""

    submit_command: str = "qsub"
    exit_codes: dict[str, int] = field(default_factory=dict)

    def submit(self, script: Path, after: str | None = None) -> str:
        # afterany: whatever way the job before ends (walltime, failure), this one may start then.
        depend = ["-W", f"depend=afterany:{after}"] if after else []
        return submit_script(["qsub", *depend, str(script)], script)

    def state(self, job_id: str) -> JobState:
        # -x includes finished jobs, whose Exit_status we keep for the event log.
        argv = ["qstat", "-x", "-f", job_id]
        result = run_command(argv)
        if result.returncode != 0:
            if any(marker in result.stderr for marker in PBS_GONE):
                return "ended"
            raise command_failure(argv, result)
        attributes = parse_pbs_attributes(result.stdout)
        if "Exit_status" in attributes:
            self.exit_codes[job_id] = int(attributes["Exit_status"])
        return pbs_job_state(attributes)

    def cancel(self, job_id: str) -> None:
        argv = ["qdel", job_id]
        result = run_command(argv)
        if result.returncode != 0 and not any(marker in result.stderr for marker in PBS_GONE):
            raise command_failure(argv, result)

    def exit_code(self, job_id: str) -> int | None:
        return self.exit_codes.get(job_id)


# --- Slurm -----------------------------------------------------------------------------------------

SLURM_QUEUED = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)
SLURM_RUNNING = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING", "STAGE_OUT"})
# Every other state (COMPLETING, COMPLETED, CANCELLED, FAILED, TIMEOUT, PREEMPTED, NODE_FAIL, ...)
# means the payload has stopped.


def split_slurm_job_id(job_id: str) -> tuple[str, str | None]:
    """`sbatch --parsable` prints "123" or "123;cluster" (when submitted with -M)."""
    number, _, cluster = job_id.partition(";")
    return number, cluster or None


def slurm_cluster_option(cluster: str | None) -> list[str]:
    return ["-M", cluster] if cluster else []


@dataclass
class SlurmScheduler:
    """Slurm: `sbatch --parsable script` prints "123" or "123;cluster"; the whole line is the job id."""

    submit_command: str = "sbatch"

    def submit(self, script: Path, after: str | None = None) -> str:
        # afterany takes the bare job number ("123" of "123;cluster"): the script's own directives put
        # the new job on the same cluster.
        depend = [f"--dependency=afterany:{split_slurm_job_id(after)[0]}"] if after else []
        return submit_script(["sbatch", "--parsable", *depend, str(script)], script)

    def state(self, job_id: str) -> JobState:
        number, cluster = split_slurm_job_id(job_id)
        argv = ["squeue", *slurm_cluster_option(cluster), "-h", "-j", number, "-o", "%T"]
        result = run_command(argv)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return "ended"
            raise command_failure(argv, result)
        # With -M, squeue prints a "CLUSTER: name" line before the job's.
        states = [line.strip() for line in result.stdout.splitlines() if line.strip() and ":" not in line]
        if not states:
            return "ended"
        if states[0] in SLURM_QUEUED:
            return "queued"
        if states[0] in SLURM_RUNNING:
            return "running"
        return "ended"

    def cancel(self, job_id: str) -> None:
        number, cluster = split_slurm_job_id(job_id)
        argv = ["scancel", *slurm_cluster_option(cluster), number]
        result = run_command(argv)
        if result.returncode != 0:
            raise command_failure(argv, result)

    def exit_code(self, job_id: str) -> int | None:
        return None  # squeue forgets it; sacct would know, but is not needed to resubmit


# --- local processes -------------------------------------------------------------------------------

LOCAL_PREFIX = "local-"


def local_pid(job_id: str) -> int:
    if not job_id.startswith(LOCAL_PREFIX):
        raise ChemFLError(f"{job_id!r} is not a local job id (local-<pid>)")
    return int(job_id.removeprefix(LOCAL_PREFIX))


def process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, which another process has yet to reap, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        # The state letter follows the parenthesised command name.
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal check is all we have


def next_log_path(script: Path) -> Path:
    n = 0
    while (log := script.with_name(f"{script.name}.{n}.log")).exists():
        n += 1
    return log


@dataclass
class LocalScheduler:
    """`bash script` in its own process group, output in <script>.<n>.log; job id "local-<pid>".

    The process that submitted a job reaps it and knows its exit code; another process (chemfl launch
    status/stop) sees only whether the pid is alive.
    """

    submit_command: str = "bash"
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    exit_codes: dict[int, int] = field(default_factory=dict)

    def submit(self, script: Path, after: str | None = None) -> str:
        if after:
            raise ChemFLError(
                "a local job starts at once: there is no queue to wait in ahead of time; remove queue-ahead"
            )
        bash = require_on_path("bash")
        with next_log_path(script).open("w") as log:
            process = subprocess.Popen(
                [bash, str(script)],
                cwd=script.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.processes[process.pid] = process
        return f"{LOCAL_PREFIX}{process.pid}"

    def state(self, job_id: str) -> JobState:
        pid = local_pid(job_id)
        process = self.processes.get(pid)
        if process is None:
            return "running" if process_alive(pid) else "ended"
        returncode = process.poll()
        if returncode is None:
            return "running"
        self.exit_codes[pid] = returncode
        del self.processes[pid]
        return "ended"

    def cancel(self, job_id: str) -> None:
        pid = local_pid(job_id)
        if pid not in self.processes and not process_alive(pid):
            return  # already over; the pid may since belong to someone else
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # the group: bash and every SuperNode it started

    def exit_code(self, job_id: str) -> int | None:
        return self.exit_codes.get(local_pid(job_id))


# --- the watcher's view ----------------------------------------------------------------------------


@dataclass
class SchedulerBackend:
    """A `Backend` that submits a target's rendered script to a scheduler."""

    scheduler: Scheduler

    def check(self, target: JobTarget) -> None:
        require_on_path(self.scheduler.submit_command)
        if not target.script.is_file():
            raise ChemFLError(f"{target.facility}: batch script {target.script} does not exist; render it first")

    def submit(self, target: JobTarget, after: str | None = None) -> str:
        return self.scheduler.submit(target.script, after=after)

    def state(self, job_id: str) -> JobState:
        return self.scheduler.state(job_id)

    def end_details(self, job_id: str) -> dict:
        code = self.scheduler.exit_code(job_id)
        return {} if code is None else {"exit_code": code}

    def cancel(self, job_id: str) -> str:
        self.scheduler.cancel(job_id)
        return ""

    def close(self) -> None:
        """Nothing held open: the scheduler keeps the jobs."""
