"""REAL deployment, layout per-job: each facility's job runs one SuperNode and one `chemfl trainer`.

The set-up of test_deployment.py (a TLS flower-superlink with SuperNode authentication set up by
`chemfl launch superlink`, keys registered, `local` facilities kept alive by `chemfl launch submit
--watch`, a real `flwr run` of this repository with a tiny model), but every job starts a 2-rank CPU
trainer (torchrun, gloo; the facility's gpus-per-node = 2), waits for `trainer ready in`, and only then
its SuperNode, whose ClientApp relays each task to the trainer over the job's Unix socket.

Checked: the trainer is ready before the SuperNode connects, and loads the model once per rank for
many tasks. Then the fault: one facility's trainer loses its rank 0 to SIGKILL while it trains a task.
That is the realistic death (the kernel's OOM killer, a segfault in a kernel, a GPU fault): it hits a
rank, and rank 0 is the one that holds the model replica being trained, the socket and the task in
flight; torchrun's agent is a small process that rarely dies alone. What must follow: the relay
replies with an error within seconds (the server writes the work off as `lost`, its reason naming the
trainer), torchrun stops the other rank and exits non-zero, the job script stops the SuperNode and
exits non-zero, the watcher resubmits, the new job's trainer becomes ready, its SuperNode is let in
and the facility's updates are accepted again; the run completes.

Strategy: FedBuff (K = 2), stopped by its wall-clock budget (`strategy.max-seconds`) rather than a
number of versions: the surviving facility keeps publishing versions while the other is away, so
only a budget leaves a known amount of time for the restart (the version count it reaches depends
on the machine's speed).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import tomli_w

from chemfl.cli import main
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.schedulers import local_pid, process_alive
from chemfl.simulation import free_port
from tests.conftest import make_config
from tests.launcher.deployment_helpers import (
    BIN,
    REPO_ROOT,
    Processes,
    metrics_lines,
    needs_flower,
    start_superlink,
    tail,
    wait_for,
)
from tests.tiny import save_tiny_llama

FACILITIES = ("a", "b")
VICTIM = "a"
RANKS = 2
RUN = "deployment-per-job"
RUN_SECONDS = 130  # the ServerApp's wall-clock budget: the fault and the restart happen inside it
SECONDS = 15.0  # "within seconds" on two busy cores
STOP_GRACE = 10  # CHEMFL_STOP_GRACE: seconds the job script gives a stopped SuperNode before SIGKILL (default 40)


def trainer_log(launch: Path, facility: str, job_id: str) -> Path:
    """Beside the job's log: chemfl-<facility>-<CHEMFL_JOB_ID>.trainer.log (a local job's id is its pid)."""
    return launch / f"chemfl-{facility}-{local_pid(job_id)}.trainer.log"


def rank_line(rank: int, logger: str, message: str) -> str:
    """A pattern for one rank's log line (chemfl.trainer.service.configure_logging's format)."""
    return rf"rank {rank}/{RANKS} {re.escape(logger)} INFO: {message}"


TRAINED = rank_line(0, "chemfl.trainer", r"trained \d+ steps")
ADMITTED = rank_line(0, "chemfl.trainer", "train request admitted")


def count(path: Path, pattern: str) -> int:
    if not path.is_file():
        return 0
    return len(re.findall(pattern, path.read_text(errors="replace"), re.MULTILINE))


def rank_pid(path: Path, rank: int) -> int | None:
    found = re.search(rank_line(rank, "chemfl.trainer", r"pid (\d+)"), path.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def job_ids(launch: Path, facility: str) -> list[str]:
    """The facility's jobs, in submission order."""
    if not (launch / "launch.jsonl").is_file():
        return []
    return [
        e["job_id"]
        for e in read_events(launch / "launch.jsonl")
        if e["facility"] == facility and e["event"] in ("submitted", "resubmitted")
    ]


def ready_before_connected(job_log: Path) -> bool:
    text = job_log.read_text(errors="replace")
    return (
        "trainer ready in" in text
        and "SuperNode ID:" in text
        and text.index("trainer ready in") < text.index("SuperNode ID:")
    )


@needs_flower
def test_REAL_per_job_deployment_survives_a_trainer_that_dies_mid_task(tmp_path: Path, processes: Processes):
    started = time.monotonic()
    # --- data, model, the run config (the trainers' recipe too), facilities file ----------------------
    data = tmp_path / "data"
    config = make_config(facilities=",".join(FACILITIES))
    build_dataset(BuildSpec.from_config(config), data)
    model = save_tiny_llama(tmp_path / "tiny-llama")
    run_config = {
        "run-name": RUN,
        "outputs.dir": str(tmp_path / "outputs"),
        "data.path": str(data),
        "data.max-molecules": config["data.max-molecules"],
        "data.facilities": ",".join(FACILITIES),
        "model.name": model,
        "model.gguf-file": "",
        "model.cache-dir": str(tmp_path / "cache"),
        "lora.r": 4,
        "lora.alpha": 8,
        "train.local-steps": 40,  # a task trains for a while: long enough to be killed in flight
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.name": "fedbuff",
        "strategy.buffer-size": 2,
        "strategy.num-versions": 10_000,  # never reached: the budget below ends the run
        "strategy.max-seconds": float(RUN_SECONDS),
        "eval.every": 0,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 0,
    }
    recipe = tmp_path / "run.toml"
    recipe.write_text(tomli_w.dumps(run_config))
    port = free_port()
    server, launch = tmp_path / "server", tmp_path / "launch"
    processes.launch_dirs.append(launch)
    facilities_file = tmp_path / "facilities.toml"
    facilities_file.write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "address": f"127.0.0.1:{port}",
                    "root-certificates": str(server / "certs" / "ca.crt"),
                    "keys-dir": str(server / "keys"),
                    "exposure": "direct",  # one machine: the SuperLink itself on 127.0.0.1 (test_proxy.py: nginx)
                },
                "facilities": {
                    name: {
                        "profile": "local",
                        "layout": "per-job",
                        "gpus-per-node": RANKS,  # torchrun starts a rank per "GPU": 2 CPU ranks
                        "recipe": str(recipe),
                        "trainer-backend": "gloo",
                        "walltime": "00:15:00",
                        "data-path": str(data / "partitions" / name),
                        "max-resubmits": 2,
                        "resubmit-backoff": 1,
                    }
                    for name in FACILITIES
                },
            }
        )
    )
    cli_home = tmp_path / "flwr-cli"  # the connection `flwr run` and `register` use
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path / "tmp"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "CHEMFL_REFUSED_PAUSE": "3",  # a refused SuperNode is retried every 3 s (default 10)
        "CHEMFL_STOP_GRACE": str(STOP_GRACE),
    }
    (tmp_path / "tmp").mkdir()

    def logs() -> str:
        job_logs = sorted(launch.glob("*.log")) if launch.is_dir() else []
        return "\n".join(
            tail(path, 60)
            for path in [tmp_path / "run.log", tmp_path / "superlink.log", tmp_path / "watcher.log", *job_logs]
        )

    # --- the SuperLink, the facilities' jobs (trainer, then SuperNode), kept alive by the watcher ------
    start_superlink(facilities_file, server, port, "chemfl-test", cli_home, env, processes, logs)
    watcher = processes.start(
        [sys.executable, "-m", "chemfl.cli", "launch", "submit", str(facilities_file), "--out", str(launch)]
        + ["--watch", "--poll", "1"],
        tmp_path / "watcher.log",
        cwd=tmp_path,
        env=env,
    )
    first_jobs = wait_for(
        lambda: all(job_ids(launch, name) for name in FACILITIES) and {n: job_ids(launch, n)[0] for n in FACILITIES},
        30,
        "the watcher did not submit the jobs",
        logs,
    )
    job_logs = {name: launch / f"{name}.sh.0.log" for name in FACILITIES}
    wait_for(
        lambda: (
            all(ready_before_connected(path) for path in job_logs.values() if path.is_file())
            and all(path.is_file() for path in job_logs.values())
        ),
        150,
        "the jobs' trainers were not ready, or their SuperNodes did not connect after them",
        logs,
    )
    connected_after = time.monotonic() - started

    # --- the run --------------------------------------------------------------------------------------
    run = processes.start(
        [str(BIN / "flwr"), "run", str(REPO_ROOT), "chemfl-test", "--run-config", str(recipe), "--stream"],
        tmp_path / "run.log",
        cwd=tmp_path,
        env={**env, "FLWR_HOME": str(cli_home)},
    )
    metrics = tmp_path / "outputs" / RUN / "metrics.jsonl"
    victim_job = first_jobs[VICTIM]
    victim_trainer = trainer_log(launch, VICTIM, victim_job)

    # --- the fault: SIGKILL to the victim's rank 0 while it trains a task (after it served two) --------
    def in_flight() -> bool:
        trained = count(victim_trainer, TRAINED)
        return trained >= 2 and count(victim_trainer, ADMITTED) > trained

    deadline = time.monotonic() + 120
    while not in_flight():  # polled fast: a task trains for about a second
        assert time.monotonic() < deadline, f"{VICTIM}'s trainer never had a third task in flight\n{logs()}"
        time.sleep(0.1)
    rank_zero = rank_pid(victim_trainer, 0)
    os.kill(rank_zero, signal.SIGKILL)
    killed_at = time.monotonic()
    assert in_flight(), f"the task finished before the kill: nothing was in flight\n{logs()}"
    trained_before_kill = count(victim_trainer, TRAINED)

    # --- what follows, each step timed from the kill ----------------------------------------------------
    seen: dict[str, float] = {}
    lost_line: dict = {}

    def note(step: str, happened: bool) -> None:
        if happened and step not in seen:
            seen[step] = time.monotonic() - killed_at

    def followed() -> bool:
        lines = metrics_lines(metrics)
        lost_at = next(
            (i for i, line in enumerate(lines) if line.get("event") == "lost" and line.get("facility") == VICTIM),
            None,
        )
        if lost_at is not None and not lost_line:
            lost_line.update(lines[lost_at])
        note("error reply (lost line)", lost_at is not None)
        note("job ended", not process_alive(local_pid(victim_job)))
        events = read_events(launch / "launch.jsonl")
        note("ended event", any(e["event"] == "ended" and e["job_id"] == victim_job for e in events))
        resubmitted = [e for e in events if e["event"] == "resubmitted" and e["facility"] == VICTIM]
        note("resubmitted", bool(resubmitted))
        new_log = launch / f"{VICTIM}.sh.1.log"
        new_text = new_log.read_text(errors="replace") if new_log.is_file() else ""
        note("new trainer ready", "trainer ready in" in new_text)
        # Refused while the stopped SuperNode's key still counts as online (it was killed after
        # CHEMFL_STOP_GRACE, before it deactivated), then let in; or let in at once.
        note("new SuperNode refused (key still online)", "code: 2004" in new_text)
        note("new SuperNode connected", "SuperNode ID:" in new_text)
        rejoined = lost_at is not None and any(
            line.get("event") == "update" and line.get("facility") == VICTIM and line["accepted"]
            for line in lines[lost_at + 1 :]
        )
        note("update accepted again", rejoined)
        return rejoined or run.poll() is not None

    wait_for(followed, RUN_SECONDS, f"{VICTIM} did not rejoin after its trainer died", logs)
    timeline = ", ".join(f"{step} +{seconds:.1f} s" for step, seconds in seen.items())
    assert "update accepted again" in seen, f"the run ended before {VICTIM} rejoined: {timeline}\n{logs()}"

    # --- the run completes -----------------------------------------------------------------------------
    wait_for(lambda: run.poll() is not None, RUN_SECONDS + 60, "flwr run did not finish", logs)
    assert run.returncode == 0, logs()
    run_dir = tmp_path / "outputs" / RUN
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file(), logs()
    lines = metrics_lines(metrics)
    versions = [line["version"] for line in lines if line.get("event") == "version"]
    assert versions == list(range(len(versions))) and len(versions) >= 3

    # The relay's error reply, within seconds, naming the trainer.
    assert seen["error reply (lost line)"] < SECONDS, timeline
    assert "TrainerError" in lost_line["reason"] and "trainer" in lost_line["reason"].split("TrainerError", 1)[1]
    # The job ended non-zero after stopping its SuperNode; the watcher resubmitted it.
    events = read_events(launch / "launch.jsonl")
    [ended] = [e for e in events if e["event"] == "ended" and e["job_id"] == victim_job]
    assert ended.get("exit_code") not in (None, 0), ended
    old_log = (launch / f"{VICTIM}.sh.0.log").read_text(errors="replace")
    assert "the trainer exited (status 1) while the SuperNode ran; stopping the SuperNode" in old_log, logs()
    assert seen["job ended"] < SECONDS + STOP_GRACE, timeline
    new_job = job_ids(launch, VICTIM)[1]
    # Every job (the victim's new one included) had its trainer ready before its SuperNode connected.
    assert all(ready_before_connected(path) for path in [*job_logs.values(), launch / f"{VICTIM}.sh.1.log"])
    # Each trainer loaded the model once per rank, across its tasks.
    survivor_job = first_jobs["b"]
    for job_trainer, least_tasks in (
        (victim_trainer, 2),
        (trainer_log(launch, "b", survivor_job), 4),
        (trainer_log(launch, VICTIM, new_job), 1),
    ):
        loaded = [count(job_trainer, rank_line(rank, "chemfl.llm.session", "model loaded")) for rank in range(RANKS)]
        tasks = count(job_trainer, TRAINED)
        assert loaded == [1, 1] and tasks >= least_tasks, (job_trainer.name, loaded, tasks)
    assert trained_before_kill >= 2
    # The victim's updates: accepted before the kill and again after its restart.
    accepted = [line for line in lines if line.get("event") == "update" and line["accepted"]]
    assert {line["facility"] for line in accepted} == set(FACILITIES)

    # --- stop: the watcher exits and every job is cancelled ---------------------------------------------
    assert main(["launch", "stop", str(launch)]) == 0
    wait_for(lambda: watcher.poll() is not None, 30, "the watcher did not exit", logs)
    assert watcher.returncode == 0, logs()
    wait_for(lambda: not any(process_alive(pid) for pid in processes.job_pids()), 30, "jobs outlived stop", logs)
    print(
        f"\nSuperNodes connected {connected_after:.0f} s after the start; killed {VICTIM}'s rank 0 (pid {rank_zero}) "
        f"mid-task after {trained_before_kill} tasks; from the kill: {timeline}; lost reason: {lost_line['reason']}; "
        f"{len(versions) - 1} versions; whole test {time.monotonic() - started:.0f} s"
    )
