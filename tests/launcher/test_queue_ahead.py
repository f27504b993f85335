"""Queue-ahead: a facility's next job is submitted while the current one runs (PBS -W depend=afterany,
Slurm --dependency=afterany, or a plain early submission), so its queue wait overlaps the running job;
the facilities-file option, its refusals, the watcher with the fake qsub/sbatch, launch.jsonl, stop."""

from __future__ import annotations

import dataclasses

import pytest

from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import queue_waits
from chemfl.launcher.commands.submit import job_targets
from chemfl.launcher.facilities import parse_plan
from chemfl.launcher.watch import Watcher, read_state, status, stop
from tests.launcher.fakes import install_fake_schedulers
from tests.launcher.test_facilities import ENDPOINT, ROCM_SETUP, plan_table, refused
from tests.launcher.test_watch import FakeClock, events, make_target, summary


@pytest.fixture
def fake(monkeypatch, tmp_path):
    return install_fake_schedulers(monkeypatch, tmp_path / "scheduler")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def ahead(target, mode: str = "dependency"):
    return dataclasses.replace(target, queue_ahead=mode)


def running_intervals(launch) -> dict[str, tuple[float, float]]:
    """job id -> (started, ended) from launch.jsonl (ended: inf while it runs)."""
    spans: dict[str, list[float]] = {}
    for event in events(launch):
        if event["event"] == "started":
            spans[event["job_id"]] = [event["time"], float("inf")]
        elif event["event"] == "ended" and event["job_id"] in spans:
            spans[event["job_id"]][1] = event["time"]
    return {job: (start, end) for job, (start, end) in spans.items()}


def never_two_running(launch) -> bool:
    spans = sorted(running_intervals(launch).values())
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))


# --- the facilities file -----------------------------------------------------------------------------


def test_the_option_and_what_it_becomes():
    assert parse_plan(plan_table()).facilities[0].queue_ahead == ""
    assert parse_plan(plan_table(queue_ahead=True)).facilities[0].queue_ahead == "dependency"
    assert parse_plan(plan_table(queue_ahead="early")).facilities[0].queue_ahead == "early"
    assert parse_plan(plan_table(queue_ahead=False)).facilities[0].queue_ahead == ""
    frontier = plan_table(profile="frontier", queue="batch", setup=ROCM_SETUP, queue_ahead=True)
    assert parse_plan(frontier).facilities[0].queue_ahead == "dependency"


def test_the_option_reaches_the_watcher(tmp_path):
    plan = parse_plan(plan_table(queue_ahead=True))
    script = tmp_path / "polaris.sh"
    script.write_text("#!/bin/bash\n")
    from chemfl.launcher.commands.submit import Rendered

    [target] = job_targets(plan, [Rendered(plan.facilities[0], script, None)])
    assert target.queue_ahead == "dependency"


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"queue_ahead": "yes"}, ["facility polaris", "queue-ahead = 'yes'", "true", '"early"', "false"]),
        ({"queue_ahead": 1}, ["queue-ahead = 1 should be true"]),
        (
            {"profile": "frontier", "queue": "debug", "setup": ROCM_SETUP, "queue_ahead": True},
            ["facility polaris", "queue-ahead", "queue debug", "forbids job chaining", "batch, extended"],
        ),
        ({"queue_ahead": True, "max_resubmits": 0}, ["max-resubmits = 0 allows none", "raise max-resubmits"]),
        (
            {"backend": "globus", "globus_endpoint": ENDPOINT, "queue_ahead": True},
            ["backend = globus", "out of sight", 'backend = "cli"'],
        ),
    ],
)
def test_refused_where_it_cannot_work(changes, fragments):
    refused(plan_table(**changes), *fragments)


def test_refused_for_local_jobs(tmp_path):
    table = plan_table(profile="local", account=None, queue=None, data_path=str(tmp_path), queue_ahead=True)
    refused(table, "profile local", "no queue to wait in", "remove queue-ahead")


def test_the_watcher_refuses_it_without_a_batch_scheduler(tmp_path):
    target = ahead(make_target(tmp_path, "laptop", "local"))
    with pytest.raises(ChemFLError, match="laptop: queue-ahead needs a batch scheduler"):
        Watcher([target], tmp_path)
    with pytest.raises(ChemFLError, match="queue-ahead mode 'soon' is unknown"):
        Watcher([ahead(make_target(tmp_path, "polaris", "pbs"), "soon")], tmp_path)


# --- the watcher with the fake schedulers ------------------------------------------------------------


def test_pbs_chain_queues_each_next_job_behind_the_running_one(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    target = ahead(make_target(launch, "polaris", "pbs", max_resubmits=2))
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    first, second, third = (f"{n}.fake-pbs-01" for n in (1001, 1002, 1003))
    script = launch / "polaris.sh"

    clock.now += 600  # a 10-minute queue wait
    fake.set_state(first, "R")
    watcher.poll_once()
    assert fake.commands()[-1] == f"qsub -W depend=afterany:{first} {script}"
    assert fake.dependency(second) == f"afterany:{first}" and fake.state(second) == "H"  # held by PBS
    watcher.poll_once()
    assert [c for c in fake.commands() if c.startswith("qsub")] == [
        f"qsub {script}",
        f"qsub -W depend=afterany:{first} {script}",
    ]
    assert [(r["job_id"], r["state"], r["ahead_job_id"]) for r in status(launch)] == [(first, "running", second)]

    clock.now += 3600  # the walltime: PBS ends the job and starts the one that waited behind it
    fake.set_state(first, "F")
    fake.set_state(second, "R")
    watcher.poll_once()
    clock.now += 3600
    fake.set_state(second, "F")
    fake.set_state(third, "Q")  # this one waits 5 minutes after its dependency is met
    watcher.poll_once()
    clock.now += 300
    fake.set_state(third, "R")
    watcher.poll_once()
    clock.now += 3600
    fake.set_state(third, "F")
    watcher.poll_once()

    assert summary(launch) == [
        ("submitted", first, 0),
        ("started", first, 0),
        ("queued-ahead", second, 1),
        ("ended", first, 0),
        ("started", second, 1),
        ("queued-ahead", third, 2),
        ("ended", second, 1),
        ("started", third, 2),  # no fourth job: max-resubmits = 2
        ("ended", third, 2),
        ("gave-up", third, 2),
    ]
    log = events(launch)
    assert log[2]["after_job_id"] == first and log[2]["dependency"] == "afterany" and log[2]["time"] == 1600
    assert log[3]["next_job_id"] == second and log[3]["resubmit_at"] is None and log[3]["ran_seconds"] == 3600
    assert log[4]["gap_seconds"] == 0 and log[4]["queue_wait_seconds"] == 3600  # waited behind the first job
    assert log[7]["gap_seconds"] == 300
    assert never_two_running(launch)
    # Waits count from the early submission, as emulation.queue-ahead counts them.
    assert queue_waits(launch / "launch.jsonl") == {"polaris": [600, 3600, 3900]}


def test_slurm_dependency_takes_the_bare_job_number(fake, clock, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_CLUSTER", "frontier")
    launch = tmp_path / "launch"
    watcher = Watcher([ahead(make_target(launch, "frontier", "slurm"))], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001", "RUNNING")
    watcher.poll_once()

    assert fake.commands()[-1] == f"sbatch --parsable --dependency=afterany:1001 {launch / 'frontier.sh'}"
    assert summary(launch) == [
        ("submitted", "1001;frontier", 0),
        ("started", "1001;frontier", 0),
        ("queued-ahead", "1002;frontier", 1),
    ]


def test_stop_cancels_the_job_queued_ahead_too(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    watcher = Watcher([ahead(make_target(launch, "polaris", "pbs"))], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001.fake-pbs-01", "R")
    watcher.poll_once()

    cancelled = stop(launch, clock=clock, sleep=clock.sleep)

    assert [e["job_id"] for e in cancelled] == ["1002.fake-pbs-01", "1001.fake-pbs-01"]  # the held one first
    assert fake.commands()[-2:] == ["qdel 1002.fake-pbs-01", "qdel 1001.fake-pbs-01"]
    assert summary(launch)[-2:] == [("cancelled", "1002.fake-pbs-01", 1), ("cancelled", "1001.fake-pbs-01", 0)]
    assert read_state(launch)["facilities"]["polaris"]["ahead_job_id"] is None
    watcher.run()  # the stop file: nothing more is submitted
    assert len([c for c in fake.commands() if c.startswith("qsub")]) == 2


def test_a_failed_submission_ahead_falls_back_to_resubmitting_at_the_end(fake, clock, tmp_path, monkeypatch):
    launch = tmp_path / "launch"
    target = ahead(make_target(launch, "perlmutter", "slurm", max_resubmits=3, backoff=60))
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001", "RUNNING")
    monkeypatch.setenv("FAKE_SCHED_FAIL", "sbatch")
    watcher.poll_once()
    monkeypatch.delenv("FAKE_SCHED_FAIL")
    watcher.poll_once()  # not retried while the job runs
    clock.now += 3600
    fake.set_state("1001", "TIMEOUT")
    watcher.poll_once()
    clock.now += 60
    watcher.poll_once()

    assert summary(launch) == [
        ("submitted", "1001", 0),
        ("started", "1001", 0),
        ("error", None, 1),
        ("ended", "1001", 0),
        ("resubmitted", "1002", 2),  # the failed attempt counts
    ]
    error = events(launch)[2]
    assert error["queue_ahead"] is True and "sbatch --parsable --dependency=afterany:1001" in error["message"]
    assert events(launch)[3]["resubmit_at"] == clock.now


def test_early_submission_is_timed_by_the_queue_wait_and_may_overlap(fake, clock, tmp_path):
    """queue-ahead = "early" (a site that refuses dependencies): a plain submission at start + walltime -
    the job's own queue wait; if the next job starts sooner, launch.jsonl says which job runs beside it."""
    launch = tmp_path / "launch"
    target = ahead(make_target(launch, "polaris", "pbs", walltime_seconds=3600), "early")
    watcher = Watcher([target], launch, clock=clock, sleep=clock.sleep, poll_seconds=30)
    watcher.submit_all()
    clock.now += 900  # waited 15 minutes
    fake.set_state("1001.fake-pbs-01", "R")
    watcher.poll_once()
    assert read_state(launch)["facilities"]["polaris"]["ahead_due"] == 1_000 + 900 + 3600 - 900

    watcher.run(stop=lambda: clock.now > 1_000 + 900 + 2700)  # naps until the submission is due
    assert [c for c in fake.commands() if c.startswith("qsub")] == [f"qsub {launch / 'polaris.sh'}"] * 2  # no -W
    assert summary(launch)[-1] == ("queued-ahead", "1002.fake-pbs-01", 1)
    assert events(launch)[-1]["time"] == 1_000 + 900 + 2700 and events(launch)[-1]["dependency"] is None

    submitted = events(launch)[-1]["time"]
    clock.now = submitted + 600  # it started 10 minutes early
    fake.set_state("1002.fake-pbs-01", "R")
    watcher.poll_once()
    clock.now += 300
    fake.set_state("1001.fake-pbs-01", "F")
    watcher.poll_once()

    log = events(launch)
    assert summary(launch)[-2:] == [("started", "1002.fake-pbs-01", 1), ("ended", "1001.fake-pbs-01", 0)]
    assert log[-2]["running_beside"] == "1001.fake-pbs-01" and log[-2]["queue_wait_seconds"] == 600
    assert log[-1]["next_job_id"] == "1002.fake-pbs-01"
    row = status(launch)[0]
    assert (row["job_id"], row["state"], row["ahead_job_id"]) == ("1002.fake-pbs-01", "running", None)
    # Its own successor is planned from its own start and wait.
    assert read_state(launch)["facilities"]["polaris"]["ahead_due"] == submitted + 600 + 3600 - 600


def test_a_job_queued_ahead_that_vanishes_is_logged_and_the_facility_resubmitted(fake, clock, tmp_path):
    launch = tmp_path / "launch"
    watcher = Watcher([ahead(make_target(launch, "polaris", "pbs"))], launch, clock=clock, sleep=clock.sleep)
    watcher.submit_all()
    fake.set_state("1001.fake-pbs-01", "R")
    watcher.poll_once()
    fake.forget("1002.fake-pbs-01")  # qdel'ed by hand
    watcher.poll_once()
    clock.now += 3600
    fake.set_state("1001.fake-pbs-01", "F")
    watcher.poll_once()

    assert summary(launch)[2:] == [
        ("queued-ahead", "1002.fake-pbs-01", 1),
        ("ended", "1002.fake-pbs-01", 1),
        ("ended", "1001.fake-pbs-01", 0),
    ]
    assert events(launch)[-1]["resubmit_at"] == clock.now + 60  # resubmitted as without queue-ahead
