"""Submit every facility's job, resubmit it when it ends while the run goes on, and log it all.

Queue-ahead (facility option `queue-ahead`, JobTarget.queue_ahead): the facility's next job is
submitted while the current one runs, so its queue wait overlaps it. "dependency" (queue-ahead =
true): as soon as the current job is seen running, with an afterany dependency on it, so the
scheduler holds it until the current one has ended: never two jobs running. "early" (for sites that
refuse dependencies): a plain submission at the current job's start + walltime - its own queue wait,
so that the next one starts about when it ends; it may start sooner, and both then run for a while.
When the current job ends, the job queued ahead takes over ("ended" names it in next_job_id; no
resubmission, no backoff). A failed early submission falls back to resubmitting at the end.
Submissions ahead count against max-resubmits like resubmissions.

Files in the launch directory
-----------------------------
launch.jsonl        every event, one JSON object per line: the format is chemfl.hpc.launch_log's.
launch-state.json   the current picture, rewritten (temp file + rename) after every poll:
    {"watcher_pid": int | null (null once the watcher has exited), "updated": float,
     "facilities": {facility: {"backend", "job_id", "state", "attempt", "resubmit_at",
                               "last_event", "last_event_time",
                               "ahead_job_id", "ahead_attempt", "ahead_due"}}}
    where state is "new" | "queued" | "running" | "waiting" (to resubmit at resubmit_at) |
    "gave-up" | "cancelled"; ahead_job_id / ahead_attempt: the job queued ahead behind job_id (null
    when none), ahead_due: when it is to be submitted (queue-ahead; null when not planned).
launch.stop         present once `stop` was asked; the watcher exits without submitting anything more.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.hpc.launch_log import (
    CANCELLED,
    ENDED,
    ERROR,
    GAVE_UP,
    QUEUED_AHEAD,
    RESUBMITTED,
    STARTED,
    SUBMITTED,
    append_event,
)
from chemfl.launcher.globus import GlobusBackend
from chemfl.launcher.schedulers import (
    Backend,
    JobTarget,
    LocalScheduler,
    PbsScheduler,
    SchedulerBackend,
    SlurmScheduler,
    process_alive,
)

logger = logging.getLogger(__name__)

STATE_FILE = "launch-state.json"
STOP_FILE = "launch.stop"

LIVE_STATES = ("queued", "running")
QUEUE_AHEAD_MODES = ("", "dependency", "early")  # JobTarget.queue_ahead
FINAL_STATES = ("gave-up", "cancelled")
# How often a napping watcher looks for the stop file, and `stop` for the watcher's exit.
STOP_CHECK_SECONDS = 1.0
STOP_WAIT_POLL_SECONDS = 0.5


def default_backends() -> dict[str, Backend]:
    """One backend per key `backend_key` can return; none of them contacts anything until used."""
    return {
        "pbs": SchedulerBackend(PbsScheduler()),
        "slurm": SchedulerBackend(SlurmScheduler()),
        "local": SchedulerBackend(LocalScheduler()),
        "globus": GlobusBackend(),
    }


def backend_key(target: JobTarget) -> str:
    """Which backend runs `target`: "globus", or its scheduler for backend = cli."""
    if target.backend == "globus":
        return "globus"
    if target.backend == "cli" and target.scheduler in ("pbs", "slurm", "local"):
        return target.scheduler
    raise ChemFLError(
        f"{target.facility}: backend {target.backend!r} with scheduler {target.scheduler!r} is not supported; "
        "use backend = cli with scheduler pbs, slurm or local, or backend = globus"
    )


def describe(error: Exception) -> str:
    return str(error) if isinstance(error, ChemFLError) else f"{type(error).__name__}: {error}"


# --- the launch directory's files ------------------------------------------------------------------


def write_state(launch_dir: Path, state: dict) -> None:
    # Readers in other processes see the old file or the new, never half.
    write_file_atomically(Path(launch_dir) / STATE_FILE, json.dumps(state, indent=2))


def read_state(launch_dir: Path) -> dict:
    path = Path(launch_dir) / STATE_FILE
    if not path.is_file():
        raise ChemFLError(f"no launch in {launch_dir} (no {STATE_FILE}); start one with chemfl launch")
    return json.loads(path.read_text(encoding="utf-8"))


# --- the watcher -----------------------------------------------------------------------------------


@dataclass
class AheadJob:
    """A facility's next job, submitted while its current one runs (queue-ahead)."""

    job_id: str
    attempt: int
    submitted_at: float
    started_at: float | None = None  # queue-ahead = "early": it may start before the current one ends


@dataclass
class FacilityJob:
    """One facility's current job and what the watcher knows of its history."""

    target: JobTarget
    backend: str
    state: str = "new"  # new | queued | running | waiting | gave-up | cancelled
    attempt: int = -1
    job_id: str | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    resubmit_at: float | None = None
    backoff_seconds: float = 0.0
    early_endings: int = 0  # consecutive jobs that ended before half their walltime
    last_event: str = ""
    last_event_time: float | None = None
    tried: int = 0  # submissions tried so far, failed ones and those ahead included: the next attempt number
    ahead: AheadJob | None = None
    ahead_due: float | None = None  # when the job ahead is to be submitted
    previous_ended_at: float | None = None  # when the facility's last job was seen ended

    def snapshot(self) -> dict:
        return {
            "backend": self.backend,
            "job_id": self.job_id,
            "state": self.state,
            "attempt": self.attempt,
            "resubmit_at": self.resubmit_at,
            "last_event": self.last_event,
            "last_event_time": self.last_event_time,
            "ahead_job_id": self.ahead.job_id if self.ahead else None,
            "ahead_attempt": self.ahead.attempt if self.ahead else None,
            "ahead_due": self.ahead_due,
        }


class Watcher:
    """Keeps one job per facility alive: submit, follow, resubmit with backoff, log every event."""

    def __init__(
        self,
        targets: Sequence[JobTarget],
        launch_dir: Path,
        backends: Mapping[str, Backend] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        poll_seconds: float = 30.0,
    ) -> None:
        names = [target.facility for target in targets]
        if len(set(names)) != len(names):
            raise ChemFLError(f"each facility may be launched once; got {names}")
        self.launch_dir = Path(launch_dir)
        self.backends = dict(default_backends() if backends is None else backends)
        self.jobs = [FacilityJob(target, backend_key(target)) for target in targets]
        for job in self.jobs:
            if job.backend not in self.backends:
                raise ChemFLError(f"{job.target.facility}: no {job.backend!r} backend was given to the watcher")
            if job.target.queue_ahead not in QUEUE_AHEAD_MODES:
                raise ChemFLError(
                    f"{job.target.facility}: queue-ahead mode {job.target.queue_ahead!r} is unknown; "
                    f"use one of {', '.join(repr(mode) for mode in QUEUE_AHEAD_MODES)}"
                )
            if job.target.queue_ahead and job.backend in ("local", "globus"):
                raise ChemFLError(
                    f"{job.target.facility}: queue-ahead needs a batch scheduler's job ids (pbs, slurm); "
                    f"the {job.backend} backend has none to wait behind: remove queue-ahead"
                )
        self.clock = clock
        self.sleep = sleep
        self.poll_seconds = poll_seconds

    @property
    def stop_file(self) -> Path:
        return self.launch_dir / STOP_FILE

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def submit_all(self) -> None:
        """Check every target, then submit each facility's first job (checks fail before any submission)."""
        for job in self.jobs:
            self.backends[job.backend].check(job.target)
        self.launch_dir.mkdir(parents=True, exist_ok=True)
        self.stop_file.unlink(missing_ok=True)  # left by an earlier launch in this directory
        now = self.clock()
        for job in self.jobs:
            self.submit(job, now)
        self.save()

    def poll_once(self) -> None:
        """Follow every live job, and make every resubmission that is due."""
        now = self.clock()
        for job in self.jobs:
            if job.state == "waiting" and now >= job.resubmit_at:
                self.submit(job, now)
            elif job.state in LIVE_STATES:
                self.follow(job, now)
            if job.state == "running" and job.ahead is None and job.ahead_due is not None and now >= job.ahead_due:
                self.submit_ahead(job, now)
        self.save()

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Submit (unless done already), then poll until `stop()`, a stop file, or every facility gave up.

        Jobs still running when it returns are left running (`stop` cancels them).
        """
        if all(job.state == "new" for job in self.jobs):
            self.submit_all()
        try:
            while not (stop() or self.stop_requested()):
                self.poll_once()
                if all(job.state in FINAL_STATES for job in self.jobs):
                    break
                self.nap()
        finally:
            self.save(watching=False)
            for backend in self.backends.values():
                backend.close()

    def nap(self) -> None:
        """Sleep until the next poll or the next due resubmission, waking early for a stop file."""
        wake = self.clock() + self.poll_seconds
        for job in self.jobs:
            if job.state == "waiting":
                wake = min(wake, job.resubmit_at)
            if job.state == "running" and job.ahead is None and job.ahead_due is not None:
                wake = min(wake, job.ahead_due)
        while (left := wake - self.clock()) > 0 and not self.stop_requested():
            self.sleep(min(left, STOP_CHECK_SECONDS))

    def submit(self, job: FacilityJob, now: float) -> None:
        if self.stop_requested():
            return  # `stop` is cancelling this launch: a new job would escape it
        job.attempt, job.tried = job.tried, job.tried + 1
        job.ahead_due = None
        try:
            job_id = self.backends[job.backend].submit(job.target)
        except Exception as error:  # the watcher outlives any one failure; the error is logged
            job.job_id = None
            resubmit_at = self.plan_resubmission(job, now, early=True)
            self.record(ERROR, job, now, message=describe(error), resubmit_at=resubmit_at)
            if resubmit_at is None:
                self.give_up(job, now)
            return
        job.job_id, job.state, job.submitted_at = job_id, "queued", now
        job.started_at = job.resubmit_at = None
        if job.attempt == 0:
            self.record(SUBMITTED, job, now)
        else:
            self.record(RESUBMITTED, job, now, delay_seconds=job.backoff_seconds)

    def submit_ahead(self, job: FacilityJob, now: float) -> None:
        """Submit the facility's next job while its current one runs (queue-ahead)."""
        job.ahead_due = None
        if self.stop_requested() or job.tried > job.target.max_resubmits:
            return
        attempt, job.tried = job.tried, job.tried + 1
        after = job.job_id if job.target.queue_ahead == "dependency" else None
        try:
            job_id = self.backends[job.backend].submit(job.target, after=after)
        except Exception as error:  # resubmitted when the current job ends instead
            self.record(ERROR, job, now, job_id=None, attempt=attempt, message=describe(error), queue_ahead=True)
            return
        job.ahead = AheadJob(job_id, attempt, now)
        self.record(
            QUEUED_AHEAD,
            job,
            now,
            job_id=job_id,
            attempt=attempt,
            after_job_id=job.job_id,
            dependency="afterany" if after else None,
        )

    def plan_ahead(self, job: FacilityJob, started_at: float, queue_wait: float) -> float | None:
        """When the job after this one is to be submitted (queue-ahead), or None."""
        target = job.target
        if not target.queue_ahead or target.resubmit_note or job.tried > target.max_resubmits:
            return None
        if target.queue_ahead == "dependency":
            return started_at
        return started_at + max(0.0, target.walltime_seconds - queue_wait)  # "early": to start as this one ends

    def follow(self, job: FacilityJob, now: float) -> None:
        backend = self.backends[job.backend]
        try:
            state = backend.state(job.job_id)
        except Exception as error:  # keep the last known state: never resubmit a job we merely lost sight of
            self.record(ERROR, job, now, message=describe(error))
            return
        if state == "ended":
            self.end(job, now)
            return
        if state == "running" and job.started_at is None:
            job.started_at = now
            gap = {} if job.previous_ended_at is None else {"gap_seconds": now - job.previous_ended_at}
            self.record(STARTED, job, now, queue_wait_seconds=now - job.submitted_at, **gap)
            job.ahead_due = self.plan_ahead(job, now, now - job.submitted_at)
        job.state = state
        if job.ahead is not None:
            self.follow_ahead(job, now)

    def end(self, job: FacilityJob, now: float) -> None:
        """The current job has ended: the job queued ahead takes over, or the next one is planned."""
        backend = self.backends[job.backend]
        ran_seconds = None if job.started_at is None else now - job.started_at
        # A job that used half its walltime was healthy (it ran into its limit): only jobs that
        # die young double the backoff.
        early = ran_seconds is None or ran_seconds < job.target.walltime_seconds / 2
        details = backend.end_details(job.job_id)
        job.previous_ended_at, job.ahead_due = now, None
        ahead = job.ahead
        if ahead is not None:
            job.early_endings = job.early_endings + 1 if early else 0
            self.record(ENDED, job, now, ran_seconds=ran_seconds, resubmit_at=None, next_job_id=ahead.job_id, **details)
            job.ahead = None
            job.job_id, job.attempt, job.submitted_at = ahead.job_id, ahead.attempt, ahead.submitted_at
            job.started_at, job.state = ahead.started_at, "queued" if ahead.started_at is None else "running"
            if ahead.started_at is not None:  # started beside the one that ended ("early")
                job.ahead_due = self.plan_ahead(job, ahead.started_at, ahead.started_at - ahead.submitted_at)
            self.follow(job, now)  # it may be running already
            return
        resubmit_at = self.plan_resubmission(job, now, early)
        self.record(ENDED, job, now, ran_seconds=ran_seconds, resubmit_at=resubmit_at, **details)
        if resubmit_at is None:
            self.give_up(job, now)

    def follow_ahead(self, job: FacilityJob, now: float) -> None:
        """The job queued ahead, while the current one still runs: it may start ("early") or vanish."""
        ahead = job.ahead
        backend = self.backends[job.backend]
        try:
            state = backend.state(ahead.job_id)
        except Exception as error:
            self.record(ERROR, job, now, job_id=ahead.job_id, attempt=ahead.attempt, message=describe(error))
            return
        if state == "running" and ahead.started_at is None:
            ahead.started_at = now
            self.record(
                STARTED,
                job,
                now,
                job_id=ahead.job_id,
                attempt=ahead.attempt,
                queue_wait_seconds=now - ahead.submitted_at,
                running_beside=job.job_id,
            )
        elif state == "ended":  # cancelled by hand, refused by the scheduler, or an "early" job that died
            ran_seconds = None if ahead.started_at is None else now - ahead.started_at
            job.ahead = None
            self.record(
                ENDED,
                job,
                now,
                job_id=ahead.job_id,
                attempt=ahead.attempt,
                ran_seconds=ran_seconds,
                resubmit_at=None,
                **backend.end_details(ahead.job_id),
            )

    def give_up(self, job: FacilityJob, now: float) -> None:
        """Record that `job`'s facility gets no more jobs; with the reason where the queue forbids chaining."""
        note = job.target.resubmit_note
        self.record(GAVE_UP, job, now, **({"reason": note} if note else {}))

    def plan_resubmission(self, job: FacilityJob, now: float, early: bool) -> float | None:
        """Set `job` waiting for its next attempt and return when it is due; None (gave-up) when none is left."""
        job.resubmit_at = None
        # A queue that forbids job chaining (Frontier debug) has max_resubmits 0 and a resubmit_note.
        if job.tried > job.target.max_resubmits or job.target.resubmit_note:
            job.state = "gave-up"
            return None
        job.early_endings = job.early_endings + 1 if early else 0
        job.backoff_seconds = job.target.resubmit_backoff_seconds * 2 ** max(job.early_endings - 1, 0)
        job.resubmit_at = now + job.backoff_seconds
        job.state = "waiting"
        return job.resubmit_at

    def record(self, event: str, job: FacilityJob, now: float, **fields) -> None:
        """Append an event about `job`'s current job (`job_id` and `attempt` in `fields`: another of its jobs)."""
        entry = {
            "time": now,
            "event": event,
            "facility": job.target.facility,
            "backend": job.backend,
            "job_id": job.job_id,
            "attempt": job.attempt,
            **fields,
        }
        append_event(self.launch_dir, entry)
        job.last_event, job.last_event_time = event, now
        level = logging.WARNING if event in (ERROR, GAVE_UP) else logging.INFO
        extra = {key: value for key, value in fields.items() if key not in ("job_id", "attempt")}
        logger.log(
            level,
            "%s: %s (job %s, attempt %d) %s",
            job.target.facility,
            event,
            entry["job_id"],
            entry["attempt"],
            extra or "",
        )

    def save(self, watching: bool = True) -> None:
        write_state(
            self.launch_dir,
            {
                "watcher_pid": os.getpid() if watching else None,
                "updated": self.clock(),
                "facilities": {job.target.facility: job.snapshot() for job in self.jobs},
            },
        )


# --- from another process: status and stop ---------------------------------------------------------


def status(launch_dir: Path) -> list[dict]:
    """One row per facility: facility, backend, job_id, state, attempts, resubmit_at, last_event, last_event_time,
    ahead_job_id (the job queued ahead behind job_id, or None)."""
    rows = []
    for facility, entry in read_state(launch_dir)["facilities"].items():
        rows.append(
            {
                "facility": facility,
                "backend": entry["backend"],
                "job_id": entry["job_id"],
                "state": entry["state"],
                "attempts": entry["attempt"] + 1,
                "resubmit_at": entry["resubmit_at"],
                "last_event": entry["last_event"],
                "last_event_time": entry["last_event_time"],
                "ahead_job_id": entry.get("ahead_job_id"),  # absent in a state file from before queue-ahead
            }
        )
    return rows


def watcher_pid(launch_dir: Path) -> int | None:
    """The pid of the watcher still following this launch; None once it has exited."""
    pid = read_state(launch_dir)["watcher_pid"]
    return pid if pid is not None and process_alive(pid) else None


def stop(
    launch_dir: Path,
    backends: Mapping[str, Backend] | None = None,
    *,
    wait_seconds: float = 60.0,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict]:
    """Tell the watcher to exit, then cancel every live job and record "cancelled"; returns those events.

    The watcher is waited for (up to `wait_seconds`) before cancelling, so that it cannot resubmit a
    job it sees ending under the cancellation. A watcher in this very process is not waited for.
    """
    launch_dir = Path(launch_dir)
    read_state(launch_dir)
    (launch_dir / STOP_FILE).touch()
    deadline = clock() + wait_seconds
    while watcher_pid(launch_dir) not in (None, os.getpid()):
        if clock() >= deadline:
            logger.warning("the watcher of %s did not exit within %.0f s; cancelling anyway", launch_dir, wait_seconds)
            break
        sleep(STOP_WAIT_POLL_SECONDS)
    backends = default_backends() if backends is None else backends
    state = read_state(launch_dir)
    now = clock()
    events = []
    for facility, entry in state["facilities"].items():
        if entry["state"] in FINAL_STATES:
            continue
        job_id = entry["job_id"] if entry["state"] in LIVE_STATES else None
        jobs = [(job_id, entry["attempt"])]
        if entry.get("ahead_job_id"):  # queued behind the current one: cancelled first, so it cannot start
            jobs.insert(0, (entry["ahead_job_id"], entry["ahead_attempt"]))
        for cancel_id, attempt in jobs:
            note = ""
            if cancel_id is not None:
                try:
                    note = backends[entry["backend"]].cancel(cancel_id)
                except Exception as error:  # cancel the other facilities regardless
                    note = f"cancel failed: {describe(error)}"
            event = {
                "time": now,
                "event": CANCELLED,
                "facility": facility,
                "backend": entry["backend"],
                "job_id": cancel_id,
                "attempt": attempt,
                "note": note,
            }
            append_event(launch_dir, event)
            events.append(event)
        entry.update(
            state="cancelled",
            resubmit_at=None,
            last_event=CANCELLED,
            last_event_time=now,
            ahead_job_id=None,
            ahead_attempt=None,
            ahead_due=None,
        )
    write_state(launch_dir, state)
    return events
