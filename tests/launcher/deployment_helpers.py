"""What the REAL deployment tests share (test_deployment.py: layout per-gpu; test_deployment_per_job.py:
layout per-job with a facility trainer): the processes a test starts and stops whatever happens, waiting
with the logs on failure, metrics.jsonl lines as they are written, the SuperLink set up and started the
way `chemfl launch superlink` documents it, and the tiny model's run config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil  # accelerate's dependency
import pytest

from chemfl.cli import main
from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.schedulers import local_pid
from chemfl.launcher.superlink import check_superlink

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

needs_flower = pytest.mark.skipif(
    not all((BIN / name).exists() for name in ("flower-superlink", "flower-supernode", "flwr")),
    reason="Flower's deployment commands are not installed beside this Python",
)


def tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return f"({path.name}: none)"
    return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Processes:
    """Everything the test starts, stopped at the end whatever happened: process groups (SIGTERM,
    then SIGKILL), the launch's watcher and every job it ever submitted."""

    def __init__(self) -> None:
        self.groups: list[subprocess.Popen] = []
        self.launch_dirs: list[Path] = []

    def start(self, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with log.open("w") as stream:
            process = subprocess.Popen(
                argv,
                stdout=stream,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kwargs,
            )
        self.groups.append(process)
        return process

    def job_pids(self) -> list[int]:
        pids = []
        for launch_dir in self.launch_dirs:
            if (launch_dir / "launch.jsonl").is_file():
                pids += [
                    local_pid(e["job_id"])
                    for e in read_events(launch_dir / "launch.jsonl")
                    if e["event"] in ("submitted", "resubmitted")
                ]
        return pids

    def stop_all(self) -> None:
        for launch_dir in self.launch_dirs:
            if launch_dir.is_dir():
                (launch_dir / "launch.stop").touch()  # the watcher submits nothing more
        # Descendants in sessions of their own (the SuperLink's SuperExec and the ServerApp it started,
        # orphaned when the SuperLink stops mid-run; trainer ranks) are killed last, by process.
        descendants = []
        for pid in [process.pid for process in self.groups] + self.job_pids():
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(pid).children(recursive=True)
        for pid in [process.pid for process in reversed(self.groups)] + self.job_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.groups:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for pid in [process.pid for process in self.groups] + self.job_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for process in self.groups:
            if process.poll() is None:
                process.wait(10)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()


def wait_for(predicate: Callable[[], object], seconds: float, what: str, logs: Callable[[], str]) -> object:
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {seconds:.0f} s)\n{logs()}")
        time.sleep(0.5)


def metrics_lines(metrics: Path) -> list[dict]:
    """Every complete line of metrics.jsonl so far, in order."""
    if not metrics.is_file():
        return []
    lines = []
    for line in metrics.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            continue
    return lines


def updates(metrics: Path) -> list[dict]:
    return [line for line in metrics_lines(metrics) if line.get("event") == "update"]


def start_superlink(
    facilities_file: Path,
    server: Path,
    port: int,
    connection: str,
    cli_home: Path,
    env: dict[str, str],
    processes: Processes,
    logs: Callable[[], str],
) -> None:
    """`chemfl launch superlink` (certificates, keys, superlink.sh, the flwr connection in `cli_home`),
    superlink.sh started from the folder above `server` (its log: superlink.log there), then, once it
    answers over TLS, `chemfl launch register`."""
    folder = server.parent
    argv = ["launch", "superlink", str(facilities_file), "--out", str(server), "--port", str(port)]
    argv += ["--bind", "127.0.0.1", "--connection", connection, "--flwr-home", str(cli_home)]
    assert main(argv) == 0
    processes.start(
        ["bash", str(server / "superlink.sh")],
        folder / "superlink.log",
        cwd=folder,
        env={**env, "FLWR_HOME": str(folder / "superlink-home")},
    )

    def superlink_up() -> bool:
        try:
            check_superlink(f"127.0.0.1:{port}", server / "certs" / "ca.crt", insecure=False, timeout=1)
        except ChemFLError:
            return False
        return True

    wait_for(superlink_up, 30, "flower-superlink did not start", logs)
    assert main(["launch", "register", str(server)]) == 0
