"""Where a rank sits in the job, read from torchrun's, mpiexec's (PMI / PALS) or srun's variables."""

from __future__ import annotations

import pytest

from chemfl.errors import ChemFLError
from chemfl.trainer.ranks import RankEnv, first_host, rank_env


def test_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "x3004c0s7b0n0", "MASTER_PORT": "29400"}
    assert rank_env(env) == RankEnv(5, 8, 1, "x3004c0s7b0n0", 29400, "torchrun")


def test_torchrun_wins_over_the_scheduler_it_runs_under():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert rank_env(env).launcher == "torchrun" and rank_env(env).master_port == 29500


def test_pmi_on_polaris_and_aurora_reads_pals_local_rank_and_the_pbs_nodefile(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("x4102c5s0b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov\nx4102c5s1b0n0.hostmgmt2000\n")
    env = {"PMI_RANK": "13", "PMI_SIZE": "24", "PALS_LOCAL_RANKID": "1", "PMI_LOCAL_RANK": "9"}
    assert rank_env({**env, "PBS_NODEFILE": str(nodefile)}) == RankEnv(
        13, 24, 1, "x4102c5s0b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov", 29500, "pmi"
    )
    del env["PALS_LOCAL_RANKID"]
    assert rank_env({**env, "MASTER_ADDR": "x3001", "MASTER_PORT": "29501"}) == RankEnv(
        13, 24, 9, "x3001", 29501, "pmi"
    )


def test_pmi_without_a_local_rank_or_rank_zeros_host_is_an_error_that_names_the_fix():
    with pytest.raises(ChemFLError, match="PALS_LOCAL_RANKID"):
        rank_env({"PMI_RANK": "0", "PMI_SIZE": "4", "MASTER_ADDR": "x3001"})
    with pytest.raises(ChemFLError, match="export MASTER_ADDR"):
        rank_env({"PMI_RANK": "0", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "0"})
    assert rank_env({"PMI_RANK": "0", "PMI_SIZE": "1"}) == RankEnv(0, 1, 0, "127.0.0.1", 29500, "pmi")


def test_slurm_srun_takes_rank_zeros_host_from_the_node_list():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "32",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "frontier[00001-00004]",
    }
    assert rank_env(env) == RankEnv(9, 32, 1, "frontier00001", 29500, "slurm")
    assert rank_env({**env, "MASTER_ADDR": "frontier00003"}).master_addr == "frontier00003"
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "nid[001,003]"}
    assert rank_env(env) == RankEnv(0, 2, 0, "nid001", 29500, "slurm")


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("frontier[00001-00004]", "frontier00001"),
        ("nid[001,003]", "nid001"),
        ("nid[003-004,001]", "nid003"),
        ("a,b", "a"),
        ("login07", "login07"),
        ("gpu[07-08]-ib,cpu1", "gpu07-ib"),
        ("nid[001-002],nid[005-006]", "nid001"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_no_launcher_is_a_single_process_and_bad_values_are_errors():
    assert rank_env({}) == RankEnv(0, 1, 0, "127.0.0.1", 29500, "single")
    with pytest.raises(ChemFLError, match="RANK = 'one' should be an integer"):
        rank_env({"RANK": "one", "WORLD_SIZE": "2"})
    with pytest.raises(ChemFLError, match="rank 4 of 4"):
        rank_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ChemFLError, match="cannot read the node list"):
        first_host("nid[001")
    torch_env = RankEnv(3, 4, 1, "h", 29501, "slurm").torch_environ()
    assert torch_env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29501"}
