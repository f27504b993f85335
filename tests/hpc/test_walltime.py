"""Where a SuperNode learns how long its batch job still runs: the environment, else PBS's qstat
(the fake in tests/launcher/fakes)."""

from __future__ import annotations

import pytest

from chemfl.hpc.walltime import parse_pbs_remaining_walltime, pbs_remaining_walltime, remaining_walltime
from chemfl.launcher.schedulers import PbsScheduler
from tests.launcher.fakes import FakeSchedulers, install_fake_schedulers


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeSchedulers:
    return install_fake_schedulers(monkeypatch, tmp_path / "scheduler")


def test_node_config_wins_then_chemfl_then_slurm():
    env = {"CHEMFL_JOB_END_TIME": "1300", "SLURM_JOB_END_TIME": "1500"}
    assert remaining_walltime({"job-end-time": 1100}, env, now=1000) == 100
    assert remaining_walltime({}, env, now=1000) == 300
    assert remaining_walltime({}, {"SLURM_JOB_END_TIME": "1500"}, now=1000) == 500


def test_outside_a_batch_job_nothing_is_known_and_past_ends_are_zero():
    assert remaining_walltime({}, {}, now=1000) is None
    assert remaining_walltime({"job-end-time": 900}, {}, now=1000) == 0.0


def test_a_malformed_value_falls_through_to_the_next_source():
    assert remaining_walltime({"job-end-time": "soon"}, {"SLURM_JOB_END_TIME": "1600"}, now=1000) == 600


def test_pbs_asks_qstat(monkeypatch):
    import chemfl.hpc.walltime as walltime

    monkeypatch.setattr(walltime, "pbs_remaining_walltime", lambda job_id: 42.0 if job_id == "7.pbs" else None)
    assert remaining_walltime({}, {"PBS_JOBID": "7.pbs"}, now=1000) == 42.0


QSTAT_F = """Job Id: 123.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov
    Job_Name = chemfl-polaris
    job_state = R
    Variable_List = PBS_O_HOME=/home/user,PBS_O_LANG=C.UTF-8,
\tPBS_O_PATH=/usr/bin:/bin
    Resource_List.walltime = 72:00:00
    resources_used.walltime = 01:30:15
"""


def test_pbs_remaining_walltime_is_limit_minus_used():
    assert parse_pbs_remaining_walltime(QSTAT_F) == 72 * 3600 - (3600 + 30 * 60 + 15)


def test_pbs_remaining_walltime_before_usage_is_reported_and_after_overrun():
    assert parse_pbs_remaining_walltime("    Resource_List.walltime = 00:10:00\n") == 600
    overrun = "    Resource_List.walltime = 00:10:00\n    resources_used.walltime = 00:10:07\n"
    assert parse_pbs_remaining_walltime(overrun) == 0
    assert parse_pbs_remaining_walltime("    job_state = R\n") is None


def test_pbs_remaining_walltime_asks_qstat(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_PBS_WALLTIME", "01:00:00")
    script = tmp_path / "polaris.sh"
    script.write_text("#!/bin/bash\n#PBS -l walltime=01:00:00\necho hello\n")
    job_id = PbsScheduler().submit(script)
    fake.set_state(job_id, "R")
    fake.set_pbs_used_walltime(job_id, "00:20:00")

    assert pbs_remaining_walltime(job_id) == 2400
    assert fake.commands()[-1] == f"qstat -f {job_id}"
    assert pbs_remaining_walltime("999.unknown") is None


def test_pbs_remaining_walltime_without_qstat_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    assert pbs_remaining_walltime("123.polaris") is None
