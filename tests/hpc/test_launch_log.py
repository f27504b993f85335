"""launch.jsonl: appended events read back, and the queue waits the emulation replays from them."""

from __future__ import annotations

import json

from chemfl.hpc.launch_log import EVENTS_FILE, STARTED, SUBMITTED, append_event, queue_waits, read_events


def test_appended_events_read_back_in_order(tmp_path):
    first = {"time": 1.0, "event": SUBMITTED, "facility": "polaris", "backend": "pbs", "job_id": "1.p", "attempt": 0}
    second = {**first, "time": 9.0, "event": STARTED}
    append_event(tmp_path, first)
    append_event(tmp_path, second)

    assert read_events(tmp_path / EVENTS_FILE) == [first, second]
    assert queue_waits(tmp_path / EVENTS_FILE) == {"polaris": [8.0]}


def test_queue_waits_on_a_written_trace(tmp_path):
    trace = tmp_path / "launch.jsonl"
    lines = [
        {"time": 0.0, "event": "submitted", "facility": "polaris", "backend": "pbs", "job_id": "1.p", "attempt": 0},
        {"time": 1.0, "event": "submitted", "facility": "frontier", "backend": "slurm", "job_id": "7", "attempt": 0},
        {"time": 2.0, "event": "submitted", "facility": "aurora", "backend": "globus", "job_id": "g-0", "attempt": 0},
        {"time": 2.0, "event": "started", "facility": "aurora", "backend": "globus", "job_id": "g-0", "attempt": 0},
        {"time": 40.0, "event": "started", "facility": "polaris", "backend": "pbs", "job_id": "1.p", "attempt": 0},
        {
            "time": 50.0,
            "event": "ended",
            "facility": "frontier",
            "backend": "slurm",
            "job_id": "7",
            "attempt": 0,
            "ran_seconds": None,
            "resubmit_at": 60.0,
        },
        {
            "time": 60.0,
            "event": "resubmitted",
            "facility": "frontier",
            "backend": "slurm",
            "job_id": "8",
            "attempt": 1,
            "delay_seconds": 10.0,
        },
        {"time": 95.5, "event": "started", "facility": "frontier", "backend": "slurm", "job_id": "8", "attempt": 1},
    ]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"time": 99.0, "event": "sta')

    assert queue_waits(trace) == {"polaris": [40.0], "frontier": [35.5]}
