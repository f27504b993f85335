"""REAL deployment on this machine: `chemfl launch` end to end with the `local` profile (and, first,
the job script's retry of a refused SuperNode against a stand-in flower-supernode).

A real flower-superlink (TLS, SuperNode authentication, a database, runtime dependency installation
off) set up by `chemfl launch superlink` and started from its superlink.sh; keys registered by
`chemfl launch register`; three local facilities started and kept alive by `chemfl launch submit
--watch`; a real `flwr run` of this repository with a tiny model. Mid-run one facility's job is
killed the way a scheduler kills a job at its walltime (SIGKILL to its process group): the watcher
resubmits it and the run finishes on the others. A SuperNode with an unregistered key is refused.
(The resubmitted SuperNode, refused while its predecessor's key still counts as online, retries until
it is let in: the job script's retry is tested below against a stand-in, and a real re-admission
after a kill in tests/launcher/test_deployment_per_job.py, whose facility must rejoin; waiting for it
here as well cost CI most of a minute.)

Strategy: FedBuff (buffer 2, 2 versions). It keeps stepping on the two facilities that remain while
the killed one is away. Synchronous FedAvg would hold its round until the killed node's work is
written off (the node misses two heartbeats, ~60 s) and then wait for min-nodes to be online again,
i.e. for the restarted SuperNode, which the SuperLink refuses for about a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w

from chemfl.cli import main
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.schedulers import local_pid, process_alive
from chemfl.launcher.superlink import make_supernode_keys
from chemfl.launcher.watch import read_state
from chemfl.simulation import free_port
from tests.conftest import make_config
from tests.launcher.deployment_helpers import (
    BIN,
    REPO_ROOT,
    Processes,
    needs_flower,
    start_superlink,
    tail,
    updates,
    wait_for,
)
from tests.tiny import save_tiny_llama

FACILITIES = ("a", "b", "c")
RUN = "deployment"


# --- the job script's retry of a refused SuperNode, with a stand-in flower-supernode -----------------

STAND_IN = """#!/bin/bash
# Refused (as flower-supernode 1.41 prints it) until its REFUSALS are used up, then runs and stops.
count=$(( $(cat "$ATTEMPTS" 2>/dev/null || echo 0) + 1 ))
echo "$count" > "$ATTEMPTS"
if (( count <= REFUSALS )); then
  echo "ERROR :     Exit Code: 305"
  echo "[code: 2004] Failed to activate SuperNode."
  exit 1
fi
echo "INFO :      SuperNode ID: 42"
"""


def run_local_script(tmp_path: Path, refusals: int, retry_seconds: int) -> subprocess.CompletedProcess:
    from chemfl.launcher.facilities import parse_plan
    from chemfl.launcher.render import render_script

    plan = parse_plan(
        {
            "superlink": {
                "address": "127.0.0.1:9092",
                "root-certificates": str(tmp_path / "ca.crt"),
                "keys-dir": str(tmp_path / "keys"),
            },
            "facilities": {
                "a": {"profile": "local", "walltime": "00:10:00", "data-path": str(tmp_path), "layout": "per-gpu"}
            },
        }
    )
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "flower-supernode").write_text(STAND_IN)
    (tmp_path / "bin" / "flower-supernode").chmod(0o755)
    (tmp_path / "job.sh").write_text(render_script(plan, plan.facilities[0]))
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "ATTEMPTS": str(tmp_path / "attempts"),
        "REFUSALS": str(refusals),
        "CHEMFL_REFUSED_RETRY": str(retry_seconds),
        "CHEMFL_REFUSED_PAUSE": "0.2",
    }
    return subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_a_refused_supernode_is_retried_until_let_in(tmp_path):
    done = run_local_script(tmp_path, refusals=2, retry_seconds=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "attempts").read_text().strip() == "3"
    assert done.stderr.count("chemfl: SuperNode 0 refused by the SuperLink; retrying in 0.2 s") == 2
    assert "SuperNode ID: 42" in done.stdout  # the SuperNode's output still reaches the job's log


def test_a_supernode_refused_for_good_fails_the_job(tmp_path):
    done = run_local_script(tmp_path, refusals=1000, retry_seconds=1)
    assert done.returncode == 1
    assert "refused for 1 s; is its key registered? (chemfl launch register)" in done.stderr
    assert 2 <= int((tmp_path / "attempts").read_text()) < 20


# --- the real deployment -----------------------------------------------------------------------------


@needs_flower
def test_REAL_deployment_survives_a_killed_facility_job(tmp_path: Path, processes: Processes):
    started = time.monotonic()
    # --- data, model, facilities file -----------------------------------------------------------
    data = tmp_path / "data"
    config = make_config(facilities=",".join(FACILITIES))
    build_dataset(BuildSpec.from_config(config), data)
    model = save_tiny_llama(tmp_path / "tiny-llama")
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
                        "layout": "per-gpu",  # per-job needs `chemfl trainer`, built separately
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
        "CHEMFL_REFUSED_PAUSE": "3",
    }  # the jobs' scripts retry a refused SuperNode every 3 s (default 10)
    (tmp_path / "tmp").mkdir()

    def logs() -> str:
        job_logs = sorted(launch.glob("*.log")) if launch.is_dir() else []
        return "\n".join(
            tail(path)
            for path in [
                tmp_path / "run.log",
                tmp_path / "superlink.log",
                tmp_path / "watcher.log",
                *job_logs,
                tmp_path / "rogue.log",
            ]
        )

    # --- the SuperLink: certificates, keys, superlink.sh, connection, registration ----------------
    start_superlink(facilities_file, server, port, "chemfl-test", cli_home, env, processes, logs)

    # A SuperNode whose key was never registered is refused (it runs beside the rest and is checked at the end).
    rogue = make_supernode_keys(tmp_path / "rogue", ["rogue-0"])["rogue-0"]
    rogue_node = processes.start(
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(server / "certs" / "ca.crt"),
            "--auth-supernode-private-key",
            str(rogue.private_key),
            "--port",
            str(free_port()),
            "--node-config",
            f"data-path='{data / 'partitions' / 'a'}'",
        ],
        tmp_path / "rogue.log",
        env={**env, "FLWR_HOME": str(tmp_path / "rogue-home")},
    )

    # --- the facilities' jobs, kept alive by the watcher ------------------------------------------
    launched_at = time.monotonic()
    watcher = processes.start(
        [
            sys.executable,
            "-m",
            "chemfl.cli",
            "launch",
            "submit",
            str(facilities_file),
            "--out",
            str(launch),
            "--watch",
            "--poll",
            "1",
        ],
        tmp_path / "watcher.log",
        cwd=tmp_path,
        env=env,
    )
    wait_for(
        lambda: (
            (launch / "launch-state.json").is_file()
            and all(entry["state"] == "running" for entry in read_state(launch)["facilities"].values())
        ),
        30,
        "the watcher did not start the three jobs",
        logs,
    )

    # --- the run ------------------------------------------------------------------------------------
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
        "train.local-steps": 2,
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.name": "fedbuff",
        "strategy.num-versions": 2,
        "strategy.buffer-size": 2,
        "eval.every": 0,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 0,
    }
    (tmp_path / "run.toml").write_text(tomli_w.dumps(run_config))
    run = processes.start(
        [
            str(BIN / "flwr"),
            "run",
            str(REPO_ROOT),
            "chemfl-test",
            "--run-config",
            str(tmp_path / "run.toml"),
            "--stream",
        ],
        tmp_path / "run.log",
        cwd=tmp_path,
        env={**env, "FLWR_HOME": str(cli_home)},
    )
    metrics = tmp_path / "outputs" / RUN / "metrics.jsonl"
    first = wait_for(lambda: updates(metrics), 150, "no update reached the server", logs)[0]
    first_update_after = time.monotonic() - launched_at

    # --- kill the job of the facility that just replied (it has new work in flight) ----------------
    victim = first["facility"]
    job = read_state(launch)["facilities"][victim]["job_id"]
    os.killpg(local_pid(job), signal.SIGKILL)

    def restarted() -> bool:
        events = [(e["facility"], e["event"], e["job_id"]) for e in read_events(launch / "launch.jsonl")]
        return (victim, "ended", job) in events and any(
            facility == victim and event == "resubmitted" for facility, event, _ in events
        )

    wait_for(restarted, 30, f"the watcher did not resubmit {victim}'s killed job", logs)

    # --- the run still finishes --------------------------------------------------------------------
    wait_for(lambda: run.poll() is not None, 240, "flwr run did not finish", logs)
    assert run.returncode == 0, logs()
    run_dir = tmp_path / "outputs" / RUN
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file(), logs()
    versions = [
        json.loads(line)["version"]
        for line in metrics.read_text().splitlines()
        if json.loads(line)["event"] == "version"
    ]
    assert versions == [0, 1, 2]
    accepted = [update for update in updates(metrics) if update["accepted"]]
    assert len(accepted) == 2 * 2 and {u["facility"] for u in accepted} >= set(FACILITIES) - {victim}

    # --- the unregistered key was refused ------------------------------------------------------------
    wait_for(lambda: rogue_node.poll() is not None, 30, "the unregistered SuperNode was not refused", logs)
    assert rogue_node.returncode != 0
    rogue_log = (tmp_path / "rogue.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in rogue_log and "Exit Code: 305" in rogue_log
    assert "SuperNode ID:" not in rogue_log

    # --- stop: the watcher exits and every job is cancelled ------------------------------------------
    assert main(["launch", "stop", str(launch)]) == 0
    wait_for(lambda: watcher.poll() is not None, 30, "the watcher did not exit", logs)
    assert watcher.returncode == 0, logs()
    wait_for(lambda: not any(process_alive(pid) for pid in processes.job_pids()), 30, "jobs outlived stop", logs)
    events = read_events(launch / "launch.jsonl")
    assert sorted(e["facility"] for e in events if e["event"] == "cancelled") == sorted(FACILITIES)
    print(
        f"first update {first_update_after:.0f} s after submission; killed {victim}; "
        f"whole test {time.monotonic() - started:.0f} s"
    )
