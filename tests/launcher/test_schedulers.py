"""PBS and Slurm through the fake commands in tests/launcher/fakes; the local scheduler for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chemfl.errors import ChemFLError
from chemfl.launcher.schedulers import (
    LocalScheduler,
    PbsScheduler,
    SlurmScheduler,
    local_pid,
    process_alive,
)
from tests.launcher.fakes import FakeSchedulers, install_fake_schedulers, wait_until


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeSchedulers:
    return install_fake_schedulers(monkeypatch, tmp_path / "scheduler")


@pytest.fixture
def script(tmp_path) -> Path:
    launch = tmp_path / "launch"
    launch.mkdir()
    path = launch / "polaris.sh"
    path.write_text("#!/bin/bash\n#PBS -l walltime=01:00:00\necho hello\n")
    return path


# --- PBS -------------------------------------------------------------------------------------------


def test_pbs_follows_a_job_from_qsub_to_qdel(fake, script):
    pbs = PbsScheduler()
    job_id = pbs.submit(script)

    assert job_id == "1001.fake-pbs-01"
    assert fake.calls()[0] == (str(script.parent), f"qsub {script}")  # submitted from the launch dir
    assert pbs.state(job_id) == "queued"
    for letter, state in [("H", "queued"), ("R", "running"), ("E", "ended"), ("F", "ended")]:
        fake.set_state(job_id, letter)
        assert pbs.state(job_id) == state
    assert "qstat -x -f 1001.fake-pbs-01" in fake.commands()


def test_pbs_cancel_ends_the_job_and_keeps_its_exit_status(fake, script):
    pbs = PbsScheduler()
    job_id = pbs.submit(script)
    fake.set_state(job_id, "R")

    pbs.cancel(job_id)

    assert fake.commands()[-1] == f"qdel {job_id}"
    assert pbs.state(job_id) == "ended"
    assert pbs.exit_code(job_id) == 271
    pbs.cancel(job_id)  # qdel of a finished job is not an error


def test_pbs_job_the_server_forgot_has_ended(fake, script):
    pbs = PbsScheduler()
    job_id = pbs.submit(script)
    fake.forget(job_id)

    assert pbs.state(job_id) == "ended"
    assert pbs.exit_code(job_id) is None


def test_pbs_failing_qstat_raises_instead_of_reporting_ended(fake, script, monkeypatch):
    pbs = PbsScheduler()
    job_id = pbs.submit(script)
    monkeypatch.setenv("FAKE_SCHED_FAIL", "qstat")

    with pytest.raises(ChemFLError, match="request rejected by the fake scheduler"):
        pbs.state(job_id)


def test_rejected_qsub_reports_its_stderr(fake, script, monkeypatch):
    monkeypatch.setenv("FAKE_SCHED_FAIL", "qsub")

    with pytest.raises(ChemFLError, match=r"`qsub .*` failed with exit code 1: qsub: request rejected"):
        PbsScheduler().submit(script)


@pytest.mark.parametrize("scheduler", [PbsScheduler(), SlurmScheduler()])
def test_missing_submit_command_says_where_to_run(scheduler, script, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    with pytest.raises(ChemFLError, match="run chemfl launch on the facility's login node, or use backend = globus"):
        scheduler.submit(script)


# --- Slurm -----------------------------------------------------------------------------------------


def test_slurm_follows_a_job_from_sbatch_to_scancel(fake, script):
    slurm = SlurmScheduler()
    job_id = slurm.submit(script)

    assert job_id == "1001"
    assert fake.calls()[0] == (str(script.parent), f"sbatch --parsable {script}")
    assert slurm.state(job_id) == "queued"
    for word, state in [("RUNNING", "running"), ("COMPLETING", "ended"), ("TIMEOUT", "ended"), ("", "ended")]:
        fake.set_state(job_id, word)
        assert slurm.state(job_id) == state
    assert "squeue -h -j 1001 -o %T" in fake.commands()

    fake.set_state(job_id, "RUNNING")
    slurm.cancel(job_id)
    assert fake.commands()[-1] == "scancel 1001"
    assert slurm.state(job_id) == "ended"
    fake.forget(job_id)
    assert slurm.state(job_id) == "ended"  # "Invalid job id specified"


def test_slurm_job_on_a_named_cluster(fake, script, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_CLUSTER", "frontier")
    slurm = SlurmScheduler()
    job_id = slurm.submit(script)
    fake_id = job_id.partition(";")[0]
    fake.set_state(fake_id, "RUNNING")

    assert job_id == "1001;frontier"
    assert slurm.state(job_id) == "running"
    slurm.cancel(job_id)
    assert fake.commands()[-2:] == ["squeue -M frontier -h -j 1001 -o %T", "scancel -M frontier 1001"]


def test_slurm_failing_squeue_raises(fake, script, monkeypatch):
    job_id = SlurmScheduler().submit(script)
    monkeypatch.setenv("FAKE_SCHED_FAIL", "squeue")

    with pytest.raises(ChemFLError, match="squeue"):
        SlurmScheduler().state(job_id)


# --- local -----------------------------------------------------------------------------------------


def test_local_job_runs_in_its_own_group_and_cancel_kills_it(tmp_path):
    script = tmp_path / "laptop.sh"
    script.write_text('echo "started in $PWD"\nsleep 30 &\nwait\n')  # a child, as SuperNodes are
    local = LocalScheduler()
    job_id = local.submit(script)
    pid = local_pid(job_id)

    assert job_id == f"local-{pid}"
    assert os.getpgid(pid) == pid
    assert local.state(job_id) == "running"
    wait_until(lambda: "started" in (tmp_path / "laptop.sh.0.log").read_text())
    assert LocalScheduler().state(job_id) == "running"  # another process sees the pid alive

    local.cancel(job_id)

    wait_until(lambda job_id=job_id: local.state(job_id) == "ended")
    assert local.exit_code(job_id) == -15
    assert (tmp_path / "laptop.sh.0.log").read_text() == f"started in {tmp_path}\n"
    assert LocalScheduler().state(job_id) == "ended"


def test_local_job_exit_code_and_one_log_per_submission(tmp_path):
    script = tmp_path / "fails.sh"
    script.write_text("echo attempt\nexit 3\n")
    local = LocalScheduler()
    first, second = local.submit(script), local.submit(script)

    for job_id in (first, second):
        wait_until(lambda job_id=job_id: local.state(job_id) == "ended")
        assert local.exit_code(job_id) == 3
    assert sorted(path.name for path in tmp_path.glob("*.log")) == ["fails.sh.0.log", "fails.sh.1.log"]
    assert not process_alive(local_pid(first))
