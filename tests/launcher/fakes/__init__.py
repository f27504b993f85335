"""Fake qsub/qstat/qdel and sbatch/squeue/scancel, keeping job state in $FAKE_SCHED_DIR.

`install_fake_schedulers` puts them first on PATH; the returned `FakeSchedulers` lets a test move a
job through its states (run it, end it) the way the real scheduler would.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class FakeSchedulers:
    root: Path

    def job_file(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def set_state(self, job_id: str, state: str) -> None:
        """PBS: a job_state letter ("R", "F"); Slurm: a squeue %T word ("RUNNING", "COMPLETED")."""
        self.job_file(job_id).write_text(state + "\n")

    def state(self, job_id: str) -> str:
        return self.job_file(job_id).read_text().strip()

    def forget(self, job_id: str) -> None:
        """The scheduler no longer knows the job (purged from its history)."""
        self.job_file(job_id).unlink()

    def dependency(self, job_id: str) -> str | None:
        """What the job was submitted to wait for ("afterany:1001"), or None."""
        path = self.root / "jobs" / f"{job_id}.depend"
        return path.read_text().strip() if path.exists() else None

    def set_pbs_used_walltime(self, job_id: str, used: str) -> None:
        (self.root / "jobs" / f"{job_id}.used").write_text(used + "\n")

    def calls(self) -> list[tuple[str, str]]:
        """(working directory, "command args...") per call, oldest first."""
        log = self.root / "calls.log"
        if not log.exists():
            return []
        return [tuple(line.split("\t", 1)) for line in log.read_text().splitlines()]

    def commands(self) -> list[str]:
        return [command for _, command in self.calls()]


def install_fake_schedulers(monkeypatch: pytest.MonkeyPatch, root: Path) -> FakeSchedulers:
    monkeypatch.setenv("PATH", f"{FAKES_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SCHED_DIR", str(root))
    monkeypatch.delenv("FAKE_SCHED_FAIL", raising=False)
    monkeypatch.delenv("FAKE_SLURM_CLUSTER", raising=False)
    root.mkdir(parents=True, exist_ok=True)
    return FakeSchedulers(root)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Real processes take a moment to die; wait generously rather than assert on timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
