"""`chemfl launch stop`: stop the watcher, then cancel every job of a launch."""

from __future__ import annotations

import argparse

from chemfl.launcher.commands.paths import require_launch
from chemfl.launcher.watch import stop


def run(args: argparse.Namespace) -> int:
    require_launch(args.launch_dir)
    events = stop(args.launch_dir, wait_seconds=args.wait)
    if not events:
        print(f"{args.launch_dir}: nothing left to stop")
    for event in events:
        what = f"job {event['job_id']} cancelled" if event["job_id"] else "resubmission called off"
        print(f"{event['facility']}: {what}" + (f" ({event['note']})" if event["note"] else ""))
    return 0
