"""The watcher: submission, following, bounded resubmission with backoff, launch.jsonl, status/stop."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import queue_waits, read_events
from chemfl.launcher.schedulers import JobTarget, local_pid, process_alive
from chemfl.launcher.watch import (
    Watcher,
    read_state,
    status,
    stop,
)
from tests.launcher.fakes import FakeSchedulers, install_fake_schedulers, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """time.time and time.sleep for the watcher: sleeping moves the clock, nothing waits."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now
        self.naps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeSchedulers:
    return install_fake_schedulers(monkeypatch, tmp_path / "scheduler")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_target(
    launch_dir: Path,
    facility: str,
    scheduler: str,
    *,
    body: str = "echo supernodes\n",
    walltime_seconds: int = 3600,
    max_resubmits: int = 2,
    backoff: float = 60.0,
) -> JobTarget:
    launch_dir.mkdir(parents=True, exist_ok=True)
    script = launch_dir / f"{facility}.sh"
    script.write_text("#!/bin/bash\n" + body)
    return JobTarget(
        facility=facility,
        scheduler=scheduler,
        backend="cli",
        script=script,
        body=body,
        walltime_seconds=walltime_seconds,
        max_resubmits=max_resubmits,
        resubmit_backoff_seconds=backoff,
    )


def events(launch_dir: Path, facility: str | None = None) -> list[dict]:
    return [e for e in read_events(launch_dir / "launch.jsonl") if facility in (None, e["facility"])]


def summary(launch_dir: Path, facility: str | None = None) -> list[tuple]:
    return [(e["event"], e["job_id"], e["attempt"]) for e in events(launch_dir, facility)]


def poll_until(watcher: Watcher, launch_dir: Path, event: str) -> None:
    """Poll (a real process is ending) until the last event logged is `event`."""

    def polled_event() -> bool:
        watcher.poll_once()
        return events(launch_dir)[-1]["event"] == event

    wait_until(polled_event)


def test_resubmits_with_doubling_backoff_then_gives_up(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    watcher = Watcher([make_target(launch, "polaris", "pbs")], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    first = "1001.fake-pbs-01"

    clock.now += 100
    fake.set_state(first, "R")
    watcher.poll_once()
    clock.now += 10
    fake.set_state(first, "F")
    watcher.poll_once()  # ran 10 s of 3600: early, backoff 60
    clock.now += 59
    watcher.poll_once()
    assert fake.commands().count(f"qsub {launch / 'polaris.sh'}") == 1  # not due yet

    clock.now += 1
    watcher.poll_once()
    second = "1002.fake-pbs-01"
    fake.set_state(second, "F")  # dies before it is ever seen running
    clock.now += 5
    watcher.poll_once()  # second early ending in a row: backoff 120
    clock.now += 120
    watcher.poll_once()
    third = "1003.fake-pbs-01"
    fake.forget(third)
    watcher.poll_once()

    assert summary(launch) == [
        ("submitted", first, 0),
        ("started", first, 0),
        ("ended", first, 0),
        ("resubmitted", second, 1),
        ("ended", second, 1),
        ("resubmitted", third, 2),
        ("ended", third, 2),
        ("gave-up", third, 2),
    ]
    log = events(launch)
    assert [e["time"] - 1000 for e in log] == [0, 100, 110, 170, 175, 295, 295, 295]
    assert log[1]["queue_wait_seconds"] == 100
    assert log[2]["ran_seconds"] == 10 and log[2]["resubmit_at"] == 1170 and log[2]["exit_code"] == 0
    assert log[3]["delay_seconds"] == 60
    assert log[4]["ran_seconds"] is None and log[4]["resubmit_at"] == 1295
    assert log[5]["delay_seconds"] == 120
    assert log[6]["resubmit_at"] is None
    assert all(set(e) >= {"time", "event", "facility", "backend", "job_id", "attempt"} for e in log)
    assert status(launch) == [
        {
            "facility": "polaris",
            "backend": "pbs",
            "job_id": third,
            "state": "gave-up",
            "attempts": 3,
            "resubmit_at": None,
            "last_event": "gave-up",
            "last_event_time": 1295,
            "ahead_job_id": None,
        }
    ]


def test_a_job_that_used_half_its_walltime_resets_the_backoff(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    target = make_target(launch, "frontier", "slurm", walltime_seconds=100, max_resubmits=5, backoff=10)
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001", "FAILED")
    watcher.poll_once()  # never ran: backoff 10
    clock.now += 10
    watcher.poll_once()
    fake.set_state("1002", "FAILED")
    watcher.poll_once()  # again: backoff 20
    clock.now += 20
    watcher.poll_once()
    fake.set_state("1003", "RUNNING")
    watcher.poll_once()
    clock.now += 60
    fake.set_state("1003", "TIMEOUT")
    watcher.poll_once()  # ran 60 of 100 s: healthy, back to 10

    delays = [e["resubmit_at"] - e["time"] for e in events(launch) if e["event"] == "ended"]
    assert delays == [10, 20, 10]


def test_pbs_and_slurm_side_by_side_and_their_queue_waits(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    targets = [make_target(launch, "polaris", "pbs"), make_target(launch, "perlmutter", "slurm")]
    watcher = Watcher(targets, launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    clock.now += 30
    fake.set_state("1002", "RUNNING")
    watcher.poll_once()
    clock.now += 45
    fake.set_state("1001.fake-pbs-01", "R")
    watcher.poll_once()
    clock.now += 15
    fake.set_state("1002", "COMPLETED")
    watcher.poll_once()
    clock.now += 60
    watcher.poll_once()  # perlmutter resubmitted as 1003
    clock.now += 200
    fake.set_state("1003", "RUNNING")
    watcher.poll_once()

    assert summary(launch, "perlmutter") == [
        ("submitted", "1002", 0),
        ("started", "1002", 0),
        ("ended", "1002", 0),
        ("resubmitted", "1003", 1),
        ("started", "1003", 1),
    ]
    assert summary(launch, "polaris") == [("submitted", "1001.fake-pbs-01", 0), ("started", "1001.fake-pbs-01", 0)]
    assert queue_waits(launch / "launch.jsonl") == {"polaris": [75], "perlmutter": [30, 200]}
    rows = {row["facility"]: row for row in status(launch)}
    assert rows["polaris"]["state"] == "running" and rows["perlmutter"]["attempts"] == 2


def test_a_failing_state_query_is_logged_and_never_resubmits(fake, clock, tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    watcher = Watcher([make_target(launch, "polaris", "pbs")], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    monkeypatch.setenv("FAKE_SCHED_FAIL", "qstat")
    watcher.poll_once()
    watcher.poll_once()

    assert summary(launch) == [("submitted", "1001.fake-pbs-01", 0)] + [("error", "1001.fake-pbs-01", 0)] * 2
    assert "request rejected" in events(launch)[-1]["message"]
    assert status(launch)[0]["state"] == "queued"


def test_failed_submissions_use_up_attempts(fake, clock, tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    monkeypatch.setenv("FAKE_SCHED_FAIL", "sbatch")
    target = make_target(launch, "frontier", "slurm", max_resubmits=1, backoff=5)
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    clock.now += 5
    watcher.poll_once()

    assert summary(launch) == [("error", None, 0), ("error", None, 1), ("gave-up", None, 1)]
    first_error = events(launch)[0]
    assert "sbatch --parsable" in first_error["message"] and first_error["resubmit_at"] == 1005


def test_checks_every_target_before_submitting_any(fake, clock, tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    targets = [make_target(launch, "perlmutter", "slurm"), make_target(launch, "polaris", "pbs")]
    only_sbatch = fake.root / "only-sbatch"
    only_sbatch.mkdir()
    (only_sbatch / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (only_sbatch / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", str(only_sbatch))
    watcher = Watcher(targets, launch, clock=clock, sleep=clock.sleep)

    with pytest.raises(ChemFLError, match="`qsub` is not on PATH: run chemfl launch on the facility's login node"):
        watcher.submit_all()
    assert fake.commands() == []


def test_unsupported_backend_is_refused(tmp_path):
    target = make_target(tmp_path, "polaris", "lsf")

    with pytest.raises(ChemFLError, match="use backend = cli with scheduler pbs, slurm or local"):
        Watcher([target], tmp_path)


def test_status_and_stop_from_a_second_call(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    targets = [make_target(launch, "polaris", "pbs"), make_target(launch, "perlmutter", "slurm")]
    watcher = Watcher(targets, launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001.fake-pbs-01", "R")
    watcher.poll_once()

    assert [(r["facility"], r["job_id"], r["state"]) for r in status(launch)] == [
        ("polaris", "1001.fake-pbs-01", "running"),
        ("perlmutter", "1002", "queued"),
    ]
    cancelled = stop(launch, clock=clock, sleep=clock.sleep)

    assert [(e["facility"], e["job_id"]) for e in cancelled] == [
        ("polaris", "1001.fake-pbs-01"),
        ("perlmutter", "1002"),
    ]
    assert fake.commands()[-2:] == ["qdel 1001.fake-pbs-01", "scancel 1002"]
    assert summary(launch)[-2:] == [("cancelled", "1001.fake-pbs-01", 0), ("cancelled", "1002", 0)]
    assert [row["state"] for row in status(launch)] == ["cancelled", "cancelled"]

    watcher.run()  # the stop file: the watcher exits at once, submitting nothing
    assert fake.commands().count(f"qsub {launch / 'polaris.sh'}") == 1
    assert read_state(launch)["watcher_pid"] is None


def test_stop_without_a_launch_says_so(tmp_path):
    with pytest.raises(ChemFLError, match="no launch in"):
        stop(tmp_path)


def test_run_naps_until_the_resubmission_is_due_and_stops_when_told(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    target = make_target(launch, "aurora", "pbs", backoff=7)
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep, poll_seconds=30)
    watcher.submit_all()
    fake.set_state("1001.fake-pbs-01", "F")  # ended by the first poll

    watcher.run(stop=lambda: clock.now >= 1_100)

    log = events(launch)
    assert summary(launch)[:3] == [
        ("submitted", "1001.fake-pbs-01", 0),
        ("ended", "1001.fake-pbs-01", 0),
        ("resubmitted", "1002.fake-pbs-01", 1),
    ]
    assert log[2]["time"] - log[1]["time"] == 7  # woke for the resubmission, not at the next 30 s poll
    assert max(clock.naps) <= 1.0  # naps in short slices to notice a stop file
    assert read_state(launch)["watcher_pid"] is None


def test_run_returns_once_every_facility_gave_up(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    watcher = Watcher([make_target(launch, "aurora", "pbs", max_resubmits=0)], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001.fake-pbs-01", "F")

    watcher.run()

    assert summary(launch) == [
        ("submitted", "1001.fake-pbs-01", 0),
        ("ended", "1001.fake-pbs-01", 0),
        ("gave-up", "1001.fake-pbs-01", 0),
    ]


def test_a_queue_that_forbids_chaining_is_never_resubmitted(fake, clock, tmp_path):
    """Frontier's debug QOS: max-resubmits is 0 there, and the gave-up event says why."""
    launch = tmp_path / "launch"
    target = make_target(launch, "frontier", "slurm", max_resubmits=0)
    note = "queue debug: OLCF's debug QOS forbids job chaining; jobs that end are not resubmitted"
    watcher = Watcher([dataclasses.replace(target, resubmit_note=note)], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001", "COMPLETED")

    watcher.run()

    assert summary(launch) == [("submitted", "1001", 0), ("ended", "1001", 0), ("gave-up", "1001", 0)]
    assert events(launch)[-1]["reason"] == note
    assert fake.commands().count(f"sbatch --parsable {launch / 'frontier.sh'}") == 1


def test_local_job_killed_is_resubmitted(clock, tmp_path):
    launch = tmp_path / "launch"
    target = make_target(launch, "laptop", "local", body="echo up\nexec sleep 30\n")
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    watcher.poll_once()
    first = events(launch)[0]["job_id"]
    assert summary(launch) == [("submitted", first, 0), ("started", first, 0)]

    wait_until(lambda: (launch / "laptop.sh.0.log").read_text() == "up\n")  # bash is up, sleeping

    os.killpg(local_pid(first), signal.SIGKILL)
    poll_until(watcher, launch, "ended")
    clock.now += 60
    watcher.poll_once()
    second = events(launch)[-1]["job_id"]

    assert summary(launch)[2:] == [("ended", first, 0), ("resubmitted", second, 1)]
    assert events(launch)[2]["exit_code"] == -signal.SIGKILL
    assert second != first and process_alive(local_pid(second))
    stop(launch, clock=clock, sleep=clock.sleep)
    wait_until(lambda: not process_alive(local_pid(second)))
    assert watcher.backends["local"].state(second) == "ended"  # reaped by the process that started it


WATCHER_PROGRAM = """
import sys
from pathlib import Path
from chemfl.launcher.schedulers import JobTarget
from chemfl.launcher.watch import Watcher

launch = Path(sys.argv[1])
target = JobTarget(facility="laptop", scheduler="local", backend="cli", script=launch / "laptop.sh", body="",
                   walltime_seconds=3600, max_resubmits=3, resubmit_backoff_seconds=0.0)
Watcher([target], launch, poll_seconds=0.05).run()
"""


def test_stop_ends_a_watcher_running_in_another_process(tmp_path):
    launch = tmp_path / "launch"
    make_target(launch, "laptop", "local", body="exec sleep 30\n")
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER_PROGRAM, str(launch)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        wait_until(lambda: (launch / "launch-state.json").exists() and status(launch)[0]["state"] == "running")
        job_id = status(launch)[0]["job_id"]

        cancelled = stop(launch, wait_seconds=10)

        assert watcher.wait(timeout=10) == 0
        assert [(e["facility"], e["job_id"]) for e in cancelled] == [("laptop", job_id)]
        wait_until(lambda: not process_alive(local_pid(job_id)))
        assert read_state(launch)["watcher_pid"] is None
        assert [e["event"] for e in events(launch)] == ["submitted", "started", "cancelled"]
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
