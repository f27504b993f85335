"""launch.jsonl: the launcher's event log, also read back as a queue-wait trace by the emulation.

Every event is appended as it happens (by the watcher, and by `chemfl launch stop` from another
process), one JSON object per line. Every line has:
    time      float: epoch seconds (the watcher's clock) when the event was seen
    event     "submitted" | "started" | "ended" | "resubmitted" | "queued-ahead" | "gave-up" | "cancelled" |
              "error"
    facility  str
    backend   "pbs" | "slurm" | "local" | "globus"
    job_id    str, or null where no job is concerned (a failed submission; a "cancelled" facility
              that was waiting to resubmit)
    attempt   int: 0 for a facility's first submission, n for its n-th resubmission (a failed
              submission uses up its attempt too)
  and per event:
    submitted    attempt 0 was accepted; job_id is the new job's
    resubmitted  attempt n >= 1 was accepted; job_id is the new job's; delay_seconds: the backoff waited
    queued-ahead attempt n >= 1 was accepted while the facility's job after_job_id runs (facility option
                 queue-ahead); job_id is the new job's; dependency: "afterany" (the scheduler holds it
                 until after_job_id has ended: qsub -W depend=afterany:<id>, sbatch
                 --dependency=afterany:<id>) or null (queue-ahead = "early": a plain submission, timed
                 to start about when after_job_id ends)
    started      the job was first seen running; queue_wait_seconds = this time - its submission's time
                 (for a job queued ahead, that includes the time it was held behind after_job_id);
                 gap_seconds (attempt >= 1) = this time - the facility's previous job's "ended" time: how
                 long the facility had no job running; running_beside: the facility's job still running
                 next to this one (queue-ahead = "early" only)
    ended        the job was first seen gone; ran_seconds = this time - its "started" time (null if it
                 was never seen running); resubmit_at: epoch seconds of the planned resubmission (null
                 when giving up, or when a job queued ahead takes over: next_job_id names it); exit_code,
                 stderr_tail, error, task_id where the backend knows them
    gave-up      follows the "ended" or "error" that used up the last attempt (attempt == max_resubmits);
                 reason: why, where the queue forbids resubmission (Frontier's debug QOS)
    cancelled    `stop` cancelled the facility; note: the backend's remark ("" or why it could not)
    error        message: what failed. A failed submission also has resubmit_at (and may be followed by
                 "gave-up"); a failed state query changes nothing (the job is asked again next poll); a
                 failed queue-ahead submission has queue_ahead: true and job_id null (the facility is
                 then resubmitted when its job ends, as without queue-ahead)
One job (facility, job_id) goes submitted|resubmitted|queued-ahead, then at most one started, then
ended or cancelled. A facility has at most one job running, plus, with queue-ahead, one queued
behind it (queue-ahead = "early" may have both running for a while). States are sampled once per
watcher poll (poll_seconds), so "started" and "ended" are late by up to one poll. For backend
"globus", "started" follows "submitted" at once: the endpoint queues the batch job out of sight, so
there is no queue wait to observe (`queue_waits` leaves it out). Queue waits of jobs queued ahead
count from their early submission, as `emulation.queue-ahead` counts them: replay such a trace with
emulation.queue-ahead = true.
"""

from __future__ import annotations

import json
from pathlib import Path

EVENTS_FILE = "launch.jsonl"  # in the launch folder

SUBMITTED = "submitted"
RESUBMITTED = "resubmitted"
QUEUED_AHEAD = "queued-ahead"
STARTED = "started"
ENDED = "ended"
GAVE_UP = "gave-up"
CANCELLED = "cancelled"
ERROR = "error"
SUBMISSION_EVENTS = (SUBMITTED, RESUBMITTED, QUEUED_AHEAD)


def append_event(launch_dir: Path, event: dict) -> None:
    # One short write on an O_APPEND file, so lines from the watcher and from `stop` never interleave.
    with (Path(launch_dir) / EVENTS_FILE).open("a", encoding="utf-8") as file:
        file.write(json.dumps(event) + "\n")


def read_events(path: Path) -> list[dict]:
    """The events of a launch.jsonl, skipping a line torn by a watcher killed while writing it."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def queue_waits(path: Path) -> dict[str, list[float]]:
    """launch.jsonl -> {facility: [started - submitted seconds, per job seen running, in order]}.

    Globus facilities are left out (their queue wait happens out of sight, inside the endpoint).
    """
    submitted_at: dict[tuple[str, str], float] = {}
    waits: dict[str, list[float]] = {}
    for event in read_events(path):
        if event["backend"] == "globus":
            continue
        key = (event["facility"], event["job_id"])
        if event["event"] in SUBMISSION_EVENTS:
            submitted_at[key] = event["time"]
            waits.setdefault(event["facility"], [])
        elif event["event"] == STARTED and key in submitted_at:
            waits[event["facility"]].append(event["time"] - submitted_at.pop(key))
    return waits
