"""`chemfl launch status`: each facility's job, attempts, last event and queue wait in a launch folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chemfl.hpc.launch_log import EVENTS_FILE, queue_waits, read_events
from chemfl.launcher.commands.paths import require_launch
from chemfl.launcher.watch import LIVE_STATES, default_backends, describe, read_state, status, watcher_pid


def run(args: argparse.Namespace) -> int:
    require_launch(args.launch_dir)
    rows = status(args.launch_dir)
    now = time.time()
    pid = watcher_pid(args.launch_dir)
    # Without a watcher the saved states age: ask the schedulers (read-only) what the jobs do now.
    current = {} if pid else current_states(rows)
    table = Table(title=f"{args.launch_dir}: {len(rows)} facilities")
    for column in ("facility", "backend", "job", "state", "attempts", "last event", "queue wait"):
        table.add_column(column, justify="right" if column in ("attempts", "queue wait") else "left")
    events_path = Path(args.launch_dir) / EVENTS_FILE
    waits = queue_waits(events_path) if events_path.is_file() else {}
    for row in rows:
        last = row["last_event"] or "-"
        if row["last_event_time"] is not None:
            last += f" ({_ago(now - row['last_event_time'])})"
        state = row["state"]
        if state == "waiting" and row["resubmit_at"] is not None:
            state += f" (resubmit in {max(0, round(row['resubmit_at'] - now))} s)"
        if current.get(row["facility"], state) != state:
            state += f", now {current[row['facility']]}"
        facility_waits = waits.get(row["facility"]) or []
        wait = f"{sum(facility_waits) / len(facility_waits):.0f} s" if facility_waits else "-"
        job = row["job_id"] or "-"
        if row.get("ahead_job_id"):
            job += f" (next: {row['ahead_job_id']}, queued ahead)"
        table.add_row(row["facility"], row["backend"], job, state, str(row["attempts"]), last, wait)
    console = Console()
    if not console.is_terminal:  # logs and pipes: room for the table
        console.width = 120
    console.print(table)
    updated = _ago(now - read_state(args.launch_dir)["updated"])
    console.print(
        f"watcher: running (pid {pid}); states as of its last poll, {updated}"
        if pid
        else f"watcher: not running, so ended jobs are not resubmitted; states saved {updated}"
        + (", 'now' from the scheduler" if current else "")
    )
    if args.events and events_path.is_file():
        for event in read_events(events_path)[-args.events :]:
            extra = {
                k: v for k, v in event.items() if k not in ("time", "event", "facility", "backend", "job_id", "attempt")
            }
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            console.print(
                f"{stamp} {event['facility']} {event['event']} {event['job_id'] or ''} "
                f"{json.dumps(extra) if extra else ''}".rstrip(),
                markup=False,
                highlight=False,
            )
    return 0


def current_states(rows: list[dict]) -> dict[str, str]:
    """facility -> what its scheduler says of its saved live job now (qstat, squeue, the local pid).
    Globus tasks are left out: only the process that submitted one can follow it."""
    backends = default_backends()
    states = {}
    for row in rows:
        if row["state"] in LIVE_STATES and row["job_id"] and row["backend"] != "globus":
            try:
                states[row["facility"]] = backends[row["backend"]].state(row["job_id"])
            except Exception as error:  # a status display must not fail on one facility's query
                states[row["facility"]] = f"unknown ({describe(error)})"
    return states


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"
