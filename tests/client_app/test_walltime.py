"""Where a SuperNode learns how long its batch job still runs."""

from chemfl.client_app.walltime import remaining_walltime


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
    import chemfl.launcher.schedulers as schedulers

    monkeypatch.setattr(schedulers, "pbs_remaining_walltime", lambda job_id: 42.0 if job_id == "7.pbs" else None)
    assert remaining_walltime({}, {"PBS_JOBID": "7.pbs"}, now=1000) == 42.0
