"""`chemfl launch submit`: check, render one batch script per facility, submit them (--dry-run: render
only), and with --watch stay to resubmit jobs that end."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.hpc.commands import require_on_path
from chemfl.launcher.commands.paths import shown
from chemfl.launcher.facilities import Facility, LaunchPlan, load_facilities
from chemfl.launcher.render import render_body, render_script
from chemfl.launcher.schedulers import JobTarget
from chemfl.launcher.superlink import check_superlink
from chemfl.launcher.watch import LIVE_STATES, Watcher, read_state, watcher_pid

SUBMIT_COMMANDS = {"pbs": "qsub", "slurm": "sbatch", "local": "bash"}


@dataclass(frozen=True)
class Rendered:
    facility: Facility
    script: Path  # <facility>.sh: the batch script
    body: Path | None  # <facility>.body.sh: what a Globus endpoint runs (backend = globus only)


def select_facilities(plan: LaunchPlan, only: list[str] | None) -> list[Facility]:
    if not only:
        return list(plan.facilities)
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    known = {facility.name: facility for facility in plan.facilities}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ChemFLError(f"--only {', '.join(unknown)}: no such facility in the file; it has {', '.join(known)}")
    return [facility for facility in plan.facilities if facility.name in names]


def check_launch_dir(launch_dir: Path) -> None:
    """Refuse a folder whose earlier launch may still have jobs or a watcher: a second copy would double them."""
    if not (Path(launch_dir) / "launch-state.json").is_file():
        return
    live = {
        name: entry
        for name, entry in read_state(launch_dir)["facilities"].items()
        if entry["state"] in (*LIVE_STATES, "waiting", "new")
    }
    if watcher_pid(launch_dir) is not None or live:
        jobs = ", ".join(f"{name} {entry['state']} {entry['job_id'] or ''}".rstrip() for name, entry in live.items())
        raise ChemFLError(
            f"{launch_dir} holds a launch that may still run ({jobs or 'its watcher is running'}); "
            f"stop it first (chemfl launch stop {launch_dir}) or pick another --out"
        )


def check_schedulers(facilities: list[Facility]) -> None:
    for facility in facilities:
        if facility.backend == "cli":
            try:
                require_on_path(SUBMIT_COMMANDS[facility.profile.scheduler])
            except ChemFLError as error:
                raise ChemFLError(
                    f"facility {facility.name}: {error} (or --dry-run to only write the scripts, "
                    f"or --only the facilities this machine can submit to)"
                ) from None
        # A local job runs with this environment: without setup lines, its commands must be on PATH here.
        if facility.profile.scheduler == "local" and not facility.setup:
            needed = ["flower-supernode"] + (["chemfl", "torchrun"] if facility.layout == "per-job" else [])
            missing = [command for command in needed if shutil.which(command) is None]
            if missing:
                raise ChemFLError(
                    f"facility {facility.name}: its job runs {', '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not on PATH here; activate the environment chemfl is "
                    'installed in (source .venv/bin/activate), or add setup = ["source /path/to/.venv/bin/activate"] '
                    "to the facility"
                )


def check_submit_folder(facilities: list[Facility], launch_dir: Path, dry_run: bool) -> list[str]:
    """Sites that run jobs only when they are submitted from outside $HOME (Aurora: from the project
    directory): qsub runs in the launch folder, so that folder must not be in the home directory.
    An error when submitting; a warning (returned) for a dry run, which may well run elsewhere."""
    warnings = []
    folder = Path(launch_dir).resolve()
    home = Path.home().resolve()
    for facility in facilities:
        why = facility.profile.submit_outside_home
        if not why or facility.backend != "cli" or not folder.is_relative_to(home):
            continue
        message = (
            f"facility {facility.name}: {why}, and the launch folder {folder} is in your home; "
            f"use --out /lus/flare/projects/<project>/chemfl/launch (or another folder outside {home})"
        )
        if not dry_run:
            raise ChemFLError(message)
        warnings.append(f"warning: {message}, before submitting these scripts")
    return warnings


def check_superlink_from_here(plan: LaunchPlan, root_certificates: Path | None) -> str:
    """check_superlink with the CA as found on this machine; returns what was checked."""
    target = plan.superlink
    if target.insecure:
        check_superlink(target.address, None, insecure=True)
        return f"SuperLink {target.address} reachable (insecure, local)"
    ca = root_certificates
    if ca is None and target.root_certificates:
        ca = Path(os.path.expandvars(os.path.expanduser(target.root_certificates)))
    if ca is not None and not ca.is_file():
        raise ChemFLError(
            f"the SuperLink check needs the CA certificate here, but {ca} does not exist on this machine; pass "
            "--root-certificates <local copy of ca.crt>, or --no-check to skip the check"
        )
    check_superlink(target.address, ca, insecure=False)
    return (
        f"SuperLink {target.address} reachable from here, its certificate verified by {ca or 'the system CAs'} "
        "(each job probes it again from its compute node, through the facility's proxy)"
    )


def write_launch_scripts(plan: LaunchPlan, facilities: list[Facility], launch_dir: Path) -> list[Rendered]:
    """<facility>.sh for each facility (rendered against the whole plan, so local runtime ports stay
    distinct with --only), and <facility>.body.sh for Globus facilities."""
    launch_dir = Path(launch_dir).resolve()
    launch_dir.mkdir(parents=True, exist_ok=True)
    rendered = []
    for facility in facilities:
        script = launch_dir / f"{facility.name}.sh"
        write_file_atomically(script, render_script(plan, facility), 0o755)
        body = None
        if facility.backend == "globus":
            body = launch_dir / f"{facility.name}.body.sh"
            write_file_atomically(body, render_body(plan, facility), 0o755)
        rendered.append(Rendered(facility, script, body))
    return rendered


def job_targets(plan: LaunchPlan, rendered: list[Rendered]) -> list[JobTarget]:
    return [
        JobTarget(
            facility=item.facility.name,
            scheduler=item.facility.profile.scheduler,
            backend=item.facility.backend,
            script=item.script,
            body=render_body(plan, item.facility),
            walltime_seconds=item.facility.walltime_seconds,
            max_resubmits=item.facility.max_resubmits,
            resubmit_backoff_seconds=item.facility.resubmit_backoff_seconds,
            globus_endpoint=item.facility.globus_endpoint,
            globus_config=dict(item.facility.globus_config),
            resubmit_note=item.facility.resubmit_note,
            queue_ahead=item.facility.queue_ahead,
        )
        for item in rendered
    ]


def run(args: argparse.Namespace) -> int:
    if args.poll <= 0:
        raise ChemFLError(f"--poll {args.poll}: give a positive number of seconds, e.g. 30")
    if args.dry_run and args.watch:
        raise ChemFLError("--dry-run submits nothing, so there is nothing to --watch; drop one of them")
    plan = load_facilities(args.facilities)
    facilities = select_facilities(plan, args.only)
    launch_dir = Path(args.out)
    check_launch_dir(launch_dir)
    warnings = check_submit_folder(facilities, launch_dir, args.dry_run)
    if args.dry_run:
        checked = "SuperLink not checked (--dry-run)"
    else:
        check_schedulers(facilities)
        checked = (
            "SuperLink not checked (--no-check)"
            if args.no_check
            else check_superlink_from_here(plan, args.root_certificates)
        )
    rendered = write_launch_scripts(plan, facilities, launch_dir)
    print(checked)
    for line in warnings:
        print(line)
    for facility in facilities:
        if facility.resubmit_note:
            print(f"{facility.name}: {facility.resubmit_note}")
        if facility.queue_ahead:
            print(f"{facility.name}: {queue_ahead_note(facility)}" + ("" if args.watch else " (with --watch)"))
    if args.dry_run:
        print_dry_run(args, rendered)
        return 0

    _log_events()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a watcher's output is read live, often from a file
    watcher = Watcher(job_targets(plan, rendered), launch_dir, poll_seconds=args.poll)
    watcher.submit_all()
    for job in watcher.jobs:
        print(f"{job.target.facility}: {job.last_event} {job.job_id or ''} ({job.backend})".rstrip())
    if not args.watch:
        watcher.save(watching=False)  # no watcher follows these jobs
        for backend in watcher.backends.values():
            backend.close()
        print(
            f"Events in {shown(launch_dir)}/launch.jsonl. Not watching: jobs that end are not resubmitted "
            f"(use --watch for that). chemfl launch status {shown(launch_dir)} | "
            f"chemfl launch stop {shown(launch_dir)}"
        )
        if any(job.backend == "globus" for job in watcher.jobs):
            print("Globus tasks can only be followed by the process that submitted them: use --watch for them.")
        return 0
    print(f"Watching (every {args.poll:g} s; chemfl launch stop {shown(launch_dir)} ends it and cancels the jobs)")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        watcher.run()
    except KeyboardInterrupt:
        print(f"\nStopped watching; jobs keep running: chemfl launch stop {shown(launch_dir)} cancels them")
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(
        "Watcher stopped" + (" (every facility gave up)" if all(job.state == "gave-up" for job in watcher.jobs) else "")
    )
    return 0


def queue_ahead_note(facility: Facility) -> str:
    if facility.queue_ahead == "early":
        return (
            "queue-ahead early: the next job is submitted, without a dependency, at this one's start + walltime - "
            "its queue wait; it may start before this one ends"
        )
    option = "-W depend=afterany:<job>" if facility.profile.scheduler == "pbs" else "--dependency=afterany:<job>"
    return f"queue-ahead: the next job is submitted with {option} as soon as this one runs"


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # the watcher saves its state on the way out


def _log_events() -> None:
    logger = logging.getLogger("chemfl.launcher.watch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def print_dry_run(args: argparse.Namespace, rendered: list[Rendered]) -> None:
    out = shown(args.out)
    print(f"Nothing submitted (--dry-run). Read and edit the scripts in {out}/, then submit:")
    width = max(len(item.facility.name) for item in rendered)
    for item in rendered:
        facility = item.facility
        name = facility.name.ljust(width)
        script = item.script.name
        if facility.backend == "globus":
            print(
                f"  {name}  {out}/{item.body.name}: run by a Globus Compute ShellFunction on endpoint "
                f"{facility.globus_endpoint} ({out}/{script} for reference)"
            )
        elif facility.profile.scheduler == "local":
            print(f"  {name}  (cd {out} && nohup bash {script} > {facility.name}.log 2>&1 &)")
        else:
            print(
                f"  {name}  (cd {out} && {SUBMIT_COMMANDS[facility.profile.scheduler]} {script})   "
                f"on a login node of {facility.name}"
            )
    only = "".join(f" --only {item.facility.name}" for item in rendered) if args.only else ""
    print(
        f"Or let chemfl submit and keep them alive: chemfl launch submit {shown(args.facilities)}{only} "
        f"--out {out} --watch"
    )
