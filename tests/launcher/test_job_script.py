"""The rendered job script's lifecycle, run for real with bash, coreutils `timeout` and stand-ins for
`chemfl trainer` (under a stand-in torchrun) and `flower-supernode`: the per-job layout's start order,
ready wait, node config and secret, and how the job ends when either service dies or the job is
cancelled or killed; and, for the per-gpu layout, that stopping a job reaches a SuperNode's children.

A stand-in SuperNode starts a child process, as flower-supernode starts its SuperExec and ClientApps:
each service runs in its own process group, so that stopping it reaches those children too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from chemfl.launcher.facilities import parse_plan
from chemfl.launcher.render import render_script
from chemfl.launcher.schedulers import process_alive
from tests.launcher.fakes import wait_until
from tests.launcher.test_render import flag, install_stand_ins

# Records itself and the child it starts; then exits (SUPERNODE_RUN=exit) or runs until stopped.
FAKE_SUPERNODE = f"""#!{sys.executable}
import json, os, signal, stat, subprocess, sys, time, uuid
records = os.environ["RECORDS"]
child = subprocess.Popen(["sleep", "300"])  # like its SuperExec and ClientApps
config = sys.argv[sys.argv.index("--node-config") + 1]
record = {{"argv": sys.argv[1:], "pid": os.getpid(), "child": child.pid, "started": time.time(),
          "pgid": os.getpgid(0), "run_dir": os.environ["CHEMFL_RUN_DIR"]}}
secret = os.environ.get("CHEMFL_TRAINER_SECRET")
if secret and os.path.exists(secret):
    record["secret_mode"] = stat.S_IMODE(os.stat(secret).st_mode)
    record["run_dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(secret)).st_mode)
    record["secret_length"] = len(open(secret).read().strip())
name = "supernode-" + uuid.uuid4().hex[:8]
with open(os.path.join(records, name + ".json"), "w") as stream:
    json.dump(record, stream)

def stopped(signum, frame):
    open(os.path.join(records, name + ".stopped"), "w").close()
    sys.exit(0)

signal.signal(signal.SIGTERM, stopped)
if os.environ.get("SUPERNODE_RUN") == "exit":
    time.sleep(0.5)
    sys.exit(0)
while True:
    time.sleep(1)
"""


def local_plan(tmp_path: Path, layout: str = "per-job"):
    (tmp_path / "shard").mkdir(exist_ok=True)
    (tmp_path / "recipe.toml").write_text('run-name = "job"\n')
    facility = {"profile": "local", "walltime": "00:10:00", "gpus-per-node": 2, "data-path": str(tmp_path / "shard")}
    if layout == "per-job":
        facility["recipe"] = str(tmp_path / "recipe.toml")
    else:
        facility["layout"] = "per-gpu"
    return parse_plan({"superlink": {"address": "127.0.0.1:9092", "insecure": True}, "facilities": {"a": facility}})


class Job:
    """A rendered local job script started the way LocalScheduler starts one (its own session and group)."""

    def __init__(self, tmp_path: Path, layout: str = "per-job", **environment: str) -> None:
        plan = local_plan(tmp_path, layout)
        self.tmp_path = tmp_path
        self.records = tmp_path / "records"
        env = {**install_stand_ins(tmp_path, fake_timeout=False, **{"flower-supernode": FAKE_SUPERNODE}), **environment}
        env["CHEMFL_STOP_GRACE"] = "5"
        script = tmp_path / "job.sh"
        script.write_text(render_script(plan, plan.facilities[0]))
        self.log = tmp_path / "job.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                ["bash", str(script)],
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job did not end in {timeout} s:\n{self.output()}") from None

    def supernodes(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.records.glob("supernode-*.json"))]

    def trainers(self) -> dict[int, dict]:
        return {
            int(path.stem.removeprefix("trainer-")): json.loads(path.read_text())
            for path in self.records.glob("trainer-*.json")
        }

    def pids(self) -> list[int]:
        """Every service process the job started: trainer ranks, SuperNodes and their children."""
        pids = [trainer["pid"] for trainer in self.trainers().values()]
        for supernode in self.supernodes():
            pids += [supernode["pid"], supernode["child"]]
        return pids

    def kill_all(self) -> None:
        for pid in [self.process.pid, *self.pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill_all()


def start(jobs: list[Job], tmp_path: Path, layout: str = "per-job", **environment: str) -> Job:
    job = Job(tmp_path, layout, **environment)
    jobs.append(job)
    return job


def all_gone(pids: list[int]) -> bool:
    return not any(process_alive(pid) for pid in pids)


def test_the_trainer_starts_first_and_the_supernode_gets_its_socket_and_secret(jobs, tmp_path):
    job = start(jobs, tmp_path, TRAINER_LOAD="1.5", SUPERNODE_RUN="exit")
    assert job.wait() == 0, job.output()
    output = job.output()

    trainers = job.trainers()
    assert sorted(trainers) == [0, 1]  # gpus-per-node 2: two ranks, numbered as torchrun does
    assert {(t["env"]["RANK"], t["env"]["LOCAL_RANK"], t["env"]["WORLD_SIZE"]) for t in trainers.values()} == {
        ("0", "0", "2"),
        ("1", "1", "2"),
    }
    argv = trainers[0]["argv"]
    assert argv[0] == "trainer" and flag(argv, "--run-config") == str(tmp_path / "recipe.toml")
    assert flag(argv, "--data-path") == str(tmp_path / "shard") and flag(argv, "--backend") == "auto"
    ready_at = float((job.records / "trainer.ready").read_text())

    (supernode,) = job.supernodes()
    assert supernode["started"] > ready_at  # the ready wait: the SuperNode only after "trainer ready in"
    assert output.index("chemfl: trainer ready in 0.3 s") < output.index("the SuperNode ended (on schedule")
    config = parse_config_args([flag(supernode["argv"], "--node-config")])
    assert config["trainer"] == f"unix:{flag(argv, '--socket')}"
    assert config["trainer-secret-file"] == flag(argv, "--secret-file")
    assert config["facility"] == "a" and config["data-path"] == str(tmp_path / "shard")
    assert isinstance(config["job-end-time"], int) and "data-slice" not in config
    assert (supernode["secret_mode"], supernode["run_dir_mode"], supernode["secret_length"]) == (0o600, 0o700, 64)
    assert not Path(flag(argv, "--secret-file")).exists()  # removed when the job ends

    # The SuperNode ended on schedule: the trainer was stopped (every rank got TERM), and nothing is left.
    assert all((job.records / f"trainer-{rank}.stopped").exists() for rank in (0, 1))
    wait_until(lambda: all_gone(job.pids()))
    log = (tmp_path / f"chemfl-a-{job.process.pid}.trainer.log").read_text()  # beside the job's log
    assert "trainer ready in 0.3 s" in log


def test_a_dead_trainer_stops_the_supernode_and_fails_the_job(jobs, tmp_path):
    job = start(jobs, tmp_path)
    wait_until(lambda: job.supernodes(), timeout=30)
    (supernode,) = job.supernodes()
    assert os.getpgid(supernode["pid"]) != os.getpgid(job.process.pid)  # its own group

    os.kill(job.trainers()[0]["pid"], signal.SIGKILL)

    assert job.wait() != 0
    output = job.output()
    assert "the trainer exited (status 137) while the SuperNode ran; stopping the SuperNode" in output
    assert list(job.records.glob("supernode-*.stopped"))  # the SuperNode got TERM before the job ended
    wait_until(lambda: all_gone([supernode["pid"], supernode["child"]]))  # and its children with it


def test_a_dead_supernode_stops_the_trainer_and_fails_the_job(jobs, tmp_path):
    job = start(jobs, tmp_path)
    wait_until(lambda: job.supernodes(), timeout=30)
    (supernode,) = job.supernodes()

    os.kill(supernode["pid"], signal.SIGKILL)

    assert job.wait() == 137
    assert "the SuperNode failed (status 137); stopping the trainer" in job.output()
    assert all((job.records / f"trainer-{rank}.stopped").exists() for rank in (0, 1))
    wait_until(lambda: all_gone(job.pids()))  # the SuperNode's orphaned child too (its group was killed)


def test_a_trainer_that_dies_while_loading_fails_the_job(jobs, tmp_path):
    job = start(jobs, tmp_path, TRAINER_EXIT="3")
    assert job.wait() == 1
    assert "the trainer exited (status 3) before it was ready; job stopped" in job.output()
    assert job.supernodes() == []


def test_a_trainer_never_ready_fails_the_job_after_the_wait(jobs, tmp_path):
    job = start(jobs, tmp_path, TRAINER_NEVER_READY="1", CHEMFL_TRAINER_READY_TIMEOUT="2")
    assert job.wait() == 1
    assert "the trainer was not ready within 2 s" in job.output()
    assert job.supernodes() == []
    assert all((job.records / f"trainer-{rank}.stopped").exists() for rank in (0, 1))  # stopped on the way out
    wait_until(lambda: all_gone(job.pids()))


def test_cancelling_the_job_stops_both_services(jobs, tmp_path):
    """`chemfl launch stop` of a local job: SIGTERM to the job's process group, which the services are not in."""
    job = start(jobs, tmp_path)
    wait_until(lambda: job.supernodes(), timeout=30)
    time.sleep(0.5)  # the script is in its monitor loop

    os.killpg(job.process.pid, signal.SIGTERM)

    assert job.wait() == 143
    assert "chemfl: job signalled (TERM): stopping its services" in job.output()
    assert list(job.records.glob("supernode-*.stopped"))
    assert all((job.records / f"trainer-{rank}.stopped").exists() for rank in (0, 1))
    wait_until(lambda: all_gone(job.pids()))


def test_a_killed_job_leaves_no_service_behind(jobs, tmp_path):
    """SIGKILL to the job's process group (no trap can run): the watchdog kills the services' groups."""
    job = start(jobs, tmp_path)
    wait_until(lambda: job.supernodes(), timeout=30)
    pids = job.pids()

    os.killpg(job.process.pid, signal.SIGKILL)
    job.wait()

    wait_until(lambda: all_gone(pids), timeout=15)


def test_stopping_a_per_gpu_job_reaches_each_supernodes_children(jobs, tmp_path):
    """Per-gpu: timeout --foreground used to stop only the SuperNode itself, never its SuperExec/ClientApps."""
    job = start(jobs, tmp_path, layout="per-gpu")
    wait_until(lambda: len(job.supernodes()) == 2, timeout=30)
    time.sleep(0.5)
    supernodes = job.supernodes()
    assert len({supernode["pgid"] for supernode in supernodes}) == 2  # a group each

    os.killpg(job.process.pid, signal.SIGTERM)

    assert job.wait() == 143
    assert len(list(job.records.glob("supernode-*.stopped"))) == 2
    wait_until(lambda: all_gone(job.pids()))
