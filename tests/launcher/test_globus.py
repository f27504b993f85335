"""The Globus backend, with a ThreadPoolExecutor standing in for the endpoint and the real ShellFunction."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import globus_compute_sdk
import pytest
from globus_compute_sdk import ShellFunction

from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import queue_waits, read_events
from chemfl.launcher.globus import CANCEL_NOTE, GlobusBackend, escape_braces
from chemfl.launcher.schedulers import JobTarget
from chemfl.launcher.watch import Watcher

BODY_WITH_BRACES = """x=5
echo "home=${HOME} literal={x} x=$x"
echo 'broke on purpose' >&2
exit 3
"""


def make_target(body: str = BODY_WITH_BRACES, facility: str = "aurora", max_resubmits: int = 1) -> JobTarget:
    return JobTarget(
        facility=facility,
        scheduler="pbs",
        backend="globus",
        script=Path("unused.sh"),
        body=body,
        walltime_seconds=60,
        max_resubmits=max_resubmits,
        resubmit_backoff_seconds=10.0,
        globus_endpoint="0b2a7ba4-6f5e-4b5f-9a8e-1c2d3e4f5a6b",
        globus_config={"queue": "debug", "nodes": 1},
    )


class ThreadPools:
    """An executor factory that records which targets it built executors for."""

    def __init__(self) -> None:
        self.built_for: list[str] = []

    def __call__(self, target: JobTarget) -> concurrent.futures.Executor:
        self.built_for.append(target.facility)
        return concurrent.futures.ThreadPoolExecutor(max_workers=1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """ShellFunction writes its stdout/stderr files in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/chemist")
    return tmp_path


def wait_for_end(backend: GlobusBackend, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while backend.state(job_id) != "ended":
        assert time.monotonic() < deadline, "the task did not finish"
        time.sleep(0.02)


def test_escaped_body_comes_back_verbatim_from_shell_function():
    body = 'echo "${HOME}" {x} {{already}} }{'

    assert ShellFunction(escape_braces(body)).cmd.format() == body


def test_runs_the_body_with_literal_braces_and_reports_its_exit_code(in_tmp):
    pools = ThreadPools()
    backend = GlobusBackend(executor_factory=pools)
    job_id = backend.submit(make_target())

    wait_for_end(backend, job_id)

    assert job_id == "globus-aurora-0"  # a ThreadPoolExecutor future has no task_id
    details = backend.end_details(job_id)
    assert details["exit_code"] == 3
    assert "broke on purpose" in details["stderr_tail"]
    [stdout] = in_tmp.glob("*.stdout")
    assert stdout.read_text() == "home=/home/chemist literal={x} x=5\n"
    backend.close()


def test_one_executor_per_facility_built_on_first_submission(in_tmp):
    pools = ThreadPools()
    backend = GlobusBackend(executor_factory=pools)
    assert pools.built_for == []

    jobs = [backend.submit(make_target("exit 0", facility)) for facility in ("aurora", "polaris", "aurora")]

    assert pools.built_for == ["aurora", "polaris"]
    assert len(set(jobs)) == 3
    for job_id in jobs:
        wait_for_end(backend, job_id)
        assert backend.end_details(job_id)["exit_code"] == 0
    backend.close()


class RecordingExecutor(concurrent.futures.Executor):
    """Stands in for globus_compute_sdk.Executor: records how it was built; futures carry a task id."""

    built_with: list[dict] = []
    submitted: list = []

    def __init__(self, **options) -> None:
        self.built_with.append(options)

    def submit(self, fn, /, *args, **kwargs):
        self.submitted.append(fn)
        future = concurrent.futures.Future()
        future.task_id = "6f1c4a52-task"
        future.set_exception(RuntimeError("endpoint offline"))
        return future


def test_default_factory_builds_a_globus_executor_only_when_submitting(monkeypatch):
    monkeypatch.setattr(globus_compute_sdk, "Executor", RecordingExecutor)
    monkeypatch.setattr(RecordingExecutor, "built_with", [])
    monkeypatch.setattr(RecordingExecutor, "submitted", [])
    backend = GlobusBackend()
    target = make_target()
    backend.check(target)
    assert RecordingExecutor.built_with == []

    job_id = backend.submit(target)

    assert RecordingExecutor.built_with == [
        {"endpoint_id": target.globus_endpoint, "user_endpoint_config": {"queue": "debug", "nodes": 1}}
    ]
    assert job_id == "6f1c4a52-task"
    assert backend.state(job_id) == "ended"
    assert backend.end_details(job_id) == {"error": "RuntimeError: endpoint offline"}
    backend.submit(target)
    first, again = RecordingExecutor.submitted
    assert again is first  # a resubmission reuses the registered function
    assert len(RecordingExecutor.built_with) == 1


def test_check_needs_an_endpoint():
    with pytest.raises(ChemFLError, match="needs a globus endpoint id"):
        GlobusBackend().check(JobTarget("aurora", "pbs", "globus", Path("x"), "", 60, 0, 1.0))


def test_cancel_is_best_effort_and_says_so(in_tmp):
    backend = GlobusBackend(executor_factory=ThreadPools())
    job_id = backend.submit(make_target("exit 0"))

    assert "cannot be cancelled once registered" in backend.cancel(job_id)
    assert backend.cancel("submitted-elsewhere") == CANCEL_NOTE
    with pytest.raises(ChemFLError, match="only the watcher that submitted"):
        backend.state("submitted-elsewhere")
    wait_for_end(backend, job_id)
    backend.close()


def test_watcher_resubmits_a_task_that_exits_nonzero_then_gives_up(in_tmp):
    now = [1_000.0]
    launch = in_tmp / "launch"
    release = in_tmp / "release"  # each task runs until the test lets it end
    body = f"while [ ! -e {release} ]; do sleep 0.01; done\nexit 4\n"
    backend = GlobusBackend(executor_factory=ThreadPools())
    watcher = Watcher([make_target(body)], launch, {"globus": backend}, clock=lambda: now[0])
    watcher.submit_all()

    def ended_count() -> int:
        watcher.poll_once()
        return sum(e["event"] == "ended" for e in read_events(launch / "launch.jsonl"))

    for attempt in (0, 1):
        watcher.poll_once()  # held by the missing release file: seen running
        release.touch()
        deadline = time.monotonic() + 10
        while ended_count() == attempt:
            assert time.monotonic() < deadline, "the task did not finish"
            time.sleep(0.02)
        release.unlink()
        now[0] += 10
        watcher.poll_once()  # the resubmission is due

    log = read_events(launch / "launch.jsonl")
    assert [(e["event"], e["attempt"]) for e in log] == [
        ("submitted", 0),
        ("started", 0),
        ("ended", 0),
        ("resubmitted", 1),
        ("started", 1),
        ("ended", 1),
        ("gave-up", 1),
    ]
    assert [e["exit_code"] for e in log if e["event"] == "ended"] == [4, 4]
    assert queue_waits(launch / "launch.jsonl") == {}  # the endpoint's queue is out of sight
    backend.close()
