"""REAL deployment on this machine: the SuperLink host goes down mid-run, and the run is resumed.

The machinery is test_deployment.py's (tests/launcher/deployment_helpers.py): a real flower-superlink
(TLS, SuperNode authentication, `--database`) set up by `chemfl launch superlink` and started from its
superlink.sh, keys registered, two `local` facilities (layout per-gpu) started by `chemfl launch submit
--watch`, and a real `flwr run` of this repository with a tiny model and FedBuff.

What flwr 1.42 runs on the SuperLink host (flwr/superlink/cli/flower_superlink.py, flwr/supercore/
superexec, flwr/supercore/app_utils.py, flwr/superlink/runtime/run_serverapp.py): superlink.sh execs
flower-superlink, which starts `flower-superexec --parent-pid <superlink>` in a session of its own
(start_new_session), which starts one `flwr-serverapp --parent-pid <superexec>` per run, in the
SuperExec's process group. Each child polls its parent every 0.2 s and raises SIGINT in itself when the
parent is gone. When the SuperLink dies, the SuperExec exits within ~2-4 s; the ServerApp's SIGINT is
handled by its main thread, so it exits only when that thread runs Python again: usually ~10 s later
(after its current Runtime API retry pause, then Flower's exit handlers), but if the SuperLink died while
the ServerApp was pushing a message, its main thread waits on the push's worker threads, which retry
forever, and the ServerApp exits only once a SuperLink answers again (before any more of the app runs).
No ServerApp carries on: a run continues only through a new `flwr run` with `resume`. (A SuperLink
SIGKILLed but not reaped by its parent is a zombie, which still "exists" to that poll: reaped at once here.)

The host goes down twice:
1. a crash: SIGKILL to the SuperLink's process group and to its SuperExec's (the ServerApp) at once;
2. the SuperLink alone (SIGKILL to superlink.sh's process group): its SuperExec must exit by itself, its
   ServerApp by itself too, at the latest once the SuperLink is back, having written nothing more.
Each time the SuperLink is started again from the same superlink.sh (same database) and `flwr run` is
given `resume = "outputs/<run>"`. The SuperNodes are never restarted: they retry the lost SuperLink
(backoff up to 20 s, at most CHEMFL_CONNECT_WAIT s per call) and carry on with their node ids, which the
database keeps. Checked: each resumed run continues from the checkpoint (next version = checkpointed + 1,
only the K - buffered updates still missing go into it), no version is repeated, no update is counted
twice (accepted update lines over the three runs == the final counter == versions x K), every update
comes from the node id of its facility's one activation, the run ends at the configured number of
versions and its final adapter (PEFT) is the last version's global adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil  # accelerate's dependency
import pytest
import tomli_w
from safetensors.numpy import load_file

from chemfl.cli import main
from chemfl.config import resolve
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.superlink import check_superlink
from chemfl.launcher.watch import read_state
from chemfl.llm.adapter_init import adapter_skeleton
from chemfl.llm.lora import adapter_layout
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.server_app.async_loop import AsyncRun
from chemfl.server_app.checkpoint import AsyncState, Checkpointer
from chemfl.server_app.outputs import AFTER_CHECKPOINT, RunOutputs
from chemfl.simulation import free_port
from tests.conftest import make_config
from tests.launcher.deployment_helpers import BIN, REPO_ROOT, Processes, metrics_lines, needs_flower, tail, wait_for
from tests.server_app.fake_grid import FakeGrid
from tests.server_app.rule_defaults import fedbuff, settings
from tests.tiny import save_tiny_llama

FACILITIES = ("a", "b")
RUN = "restart"
K = 2  # FedBuff buffer size
VERSIONS = 4  # two faults, each at a version < VERSIONS: work is left for the resumed run
MARKER = "CHEMFL_RESTART_TEST"  # in the environment of everything the test starts, and so of their children


class HostProcesses(Processes):
    """Processes, plus what escapes its process groups: the SuperExec a SuperLink starts in a session of
    its own, with the ServerApps. Everything started with MARKER=`marker` in its environment is
    inherited by all its descendants; what still runs after stop_all is killed, and is an error."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def marked(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):  # gone, a zombie, or another user's
                if process.environ().get(MARKER) == self.marker:
                    found.append(process)
        return found

    def stop_all(self) -> None:
        super().stop_all()
        for process in named(self.marked(), "flower-superexec") + named(self.marked(), "flwr-serverapp"):
            with contextlib.suppress(psutil.Error):
                process.terminate()  # as the SuperLink would have done
        gone, alive = psutil.wait_procs(self.marked(), timeout=15)
        leaks = []
        for process in alive:
            with contextlib.suppress(psutil.Error):
                leaks.append(" ".join(process.cmdline()[:3]))
                process.kill()
        assert not alive, f"outlived the test: {leaks}"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostProcesses]:
    started = HostProcesses(str(tmp_path))
    try:
        yield started
    finally:
        started.stop_all()


def checkpoint(run_dir: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):  # state.json is renamed into place: whole or absent
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())
    return None


def tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def named(processes: list[psutil.Process], name: str) -> list[psutil.Process]:
    found = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if any(Path(part).name == name for part in process.cmdline()[:2]):
                found.append(process)
    return found


# --- the crash window, in-process: lines written, checkpoint not yet --------------------------------------


@pytest.mark.usefixtures("server_task_identity")
def test_a_resume_sets_aside_the_metrics_lines_its_checkpoint_does_not_count(tmp_path: Path):
    """The loop writes an update's line, publishes, evaluates the new version, writes its line and only
    then checkpoints. A ServerApp killed while evaluating left an update line the checkpoint does not
    count; the resumed run redoes that update, so without the rewind metrics.jsonl would count it twice
    (and show the version twice)."""
    outputs = RunOutputs(tmp_path, "run")
    checkpointer = Checkpointer(outputs.dir / "checkpoint", journal=outputs.metrics_path)

    def loop(strategy, state: AsyncState, checkpointer: Checkpointer, evaluate) -> AsyncRun:
        grid = FakeGrid(durations={1: 1.0, 2: 1.5})
        return AsyncRun(
            grid=grid,
            strategy=strategy,
            state=state,
            settings=settings(num_versions=4, eval_every=1, poll_seconds=1.0),
            evaluate=evaluate,
            record=outputs.append_metrics,
            checkpointer=checkpointer,
            clock=grid.clock,
            sleep=grid.advance,
        )

    def killed_at_version_2(version: int, params) -> float:
        if version == 2:
            raise KeyboardInterrupt  # the ServerApp dies while evaluating version 2
        return 1.0

    params = {"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}
    with pytest.raises(KeyboardInterrupt):
        loop(fedbuff(buffer_size=2), AsyncState(params=params), checkpointer, killed_at_version_2).run()
    written = metrics_lines(outputs.metrics_path)
    assert written[-1]["event"] == "update" and written[-1]["version"] == 1  # its version 2 never checkpointed

    strategy = fedbuff(buffer_size=2)
    resumed = Checkpointer(outputs.dir / "checkpoint", journal=outputs.metrics_path)
    state = resumed.load(strategy)
    assert state.version == 1 and len(strategy.buffer) == 1
    again = RunOutputs(tmp_path, "run", resume=outputs.dir)
    assert again.rewind_metrics(state.journal_bytes) == 1
    assert metrics_lines(outputs.dir / AFTER_CHECKPOINT) == written[-1:]
    assert again.rewind_metrics(state.journal_bytes) == 0  # nothing more to move
    run = loop(strategy, state, resumed, lambda version, params: 1.0)
    run.run()

    every = metrics_lines(outputs.metrics_path)
    assert [line["version"] for line in every if line["event"] == "version"] == [0, 1, 2, 3, 4]
    accepted = [line for line in every if line["event"] == "update" and line["accepted"]]
    assert len(accepted) == run.state.counters["accepted"] == 4 * 2
    # The run's end is checkpointed with everything it wrote: resuming the finished run moves nothing.
    assert Checkpointer(outputs.dir / "checkpoint").load(fedbuff(buffer_size=2)).journal_bytes == (
        outputs.metrics_path.stat().st_size
    )
    state_file = outputs.dir / "checkpoint" / "state.json"
    state_file.write_text(state_file.read_text().replace('"journal_bytes": ', '"journal_bytes": -'))
    with pytest.raises(ChemFLError, match="'journal_bytes' = -[0-9]+ is not a byte count"):
        Checkpointer(outputs.dir / "checkpoint").load(fedbuff(buffer_size=2))


# --- the real deployment ------------------------------------------------------------------------------------


@needs_flower
def test_REAL_superlink_restarts_and_the_run_resumes(tmp_path: Path, host: HostProcesses):
    started = time.monotonic()
    report: list[str] = []

    def note(line: str) -> None:  # shown with -s, and with the captured output of a failure
        report.append(line)
        print(line, flush=True)

    data = tmp_path / "data"
    config = make_config(facilities=",".join(FACILITIES))
    build_dataset(BuildSpec.from_config(config), data)
    model = save_tiny_llama(tmp_path / "tiny-llama")
    port = free_port()
    server, launch = tmp_path / "server", tmp_path / "launch"
    host.launch_dirs.append(launch)
    facilities_file = tmp_path / "facilities.toml"
    local = {"profile": "local", "layout": "per-gpu", "walltime": "00:15:00"}
    facilities_file.write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "address": f"127.0.0.1:{port}",
                    "root-certificates": str(server / "certs" / "ca.crt"),
                    "keys-dir": str(server / "keys"),
                    "exposure": "direct",
                },
                "facilities": {
                    # Local SuperNodes take runtime ports 9094 + their index among the file's local facilities
                    # (chemfl.launcher.render.first_runtime_port), so two launches on one machine collide. This
                    # placeholder (never submitted: --only) moves ours past test_deployment*.py's (9094-9096),
                    # so that the deployment tests can run side by side.
                    "ports": {**local, "gpus-per-node": 3, "data-path": str(data)},
                    **{
                        # max-resubmits 0: the SuperNodes must come through the restarts without a new job.
                        name: {**local, "data-path": str(data / "partitions" / name), "max-resubmits": 0}
                        for name in FACILITIES
                    },
                },
            }
        )
    )
    cli_home = tmp_path / "flwr-cli"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path / "tmp"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        MARKER: host.marker,
    }
    (tmp_path / "tmp").mkdir()
    superlink_logs: list[Path] = []
    run_logs: list[Path] = []

    def job_log(name: str) -> Path:
        return launch / f"{name}.sh.0.log"

    def logs() -> str:
        paths = [*run_logs, *superlink_logs, tmp_path / "watcher.log", *(job_log(name) for name in FACILITIES)]
        return "\n".join(["--- so far", *report, *(tail(path) for path in paths)])

    argv = ["launch", "superlink", str(facilities_file), "--out", str(server), "--port", str(port)]
    assert main([*argv, "--bind", "127.0.0.1", "--connection", "chemfl-test", "--flwr-home", str(cli_home)]) == 0

    def superlink_up() -> bool:
        try:
            check_superlink(f"127.0.0.1:{port}", server / "certs" / "ca.crt", insecure=False, timeout=1)
        except ChemFLError:
            return False
        return True

    def start_superlink() -> subprocess.Popen:
        """superlink.sh, always the same (same database), from the same folder."""
        superlink_logs.append(tmp_path / f"superlink-{len(superlink_logs)}.log")
        process = host.start(
            ["bash", str(server / "superlink.sh")],
            superlink_logs[-1],
            cwd=tmp_path,
            env={**env, "FLWR_HOME": str(tmp_path / "superlink-home")},
        )
        wait_for(superlink_up, 30, "flower-superlink did not start", logs)
        return process

    superlink = start_superlink()
    assert main(["launch", "register", str(server)]) == 0
    watcher = host.start(
        [sys.executable, "-m", "chemfl.cli", "launch", "submit", str(facilities_file), "--out", str(launch)]
        + ["--only", ",".join(FACILITIES), "--watch", "--poll", "1"],
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
        "the watcher did not start the jobs",
        logs,
    )
    jobs = {name: entry["job_id"] for name, entry in read_state(launch)["facilities"].items()}

    run_dir = tmp_path / "outputs" / RUN
    metrics = run_dir / "metrics.jsonl"
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
        "train.local-steps": 1,
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.name": "fedbuff",
        "strategy.num-versions": VERSIONS,
        "strategy.buffer-size": K,
        "eval.every": 0,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 0,
    }

    def flwr_run(overrides: dict) -> subprocess.Popen:
        """`flwr run . chemfl-test --run-config FILE --stream`: the recipe, plus `overrides`."""
        recipe = tmp_path / f"run-{len(run_logs)}.toml"
        recipe.write_text(tomli_w.dumps({**run_config, **overrides}))
        run_logs.append(recipe.with_suffix(".log"))
        return host.start(
            [str(BIN / "flwr"), "run", str(REPO_ROOT), "chemfl-test", "--run-config", str(recipe), "--stream"],
            run_logs[-1],
            cwd=tmp_path,
            env={**env, "FLWR_HOME": str(cli_home)},
        )

    def wait_for_checkpoint(after_version: int, grace: float = 0.0) -> dict:
        """A checkpoint past `after_version`; up to `grace` s more for one with a half-full buffer."""
        state = wait_for(
            lambda: (state := checkpoint(run_dir)) and state["version"] > after_version and state,
            180,
            f"no version after {after_version} was checkpointed",
            logs,
        )
        deadline = time.monotonic() + grace
        while not state["buffer"] and time.monotonic() < deadline:
            time.sleep(0.1)
            newer = checkpoint(run_dir) or state
            if newer["version"] != state["version"]:  # no half-full buffer at this version: fault now
                return newer
            state = newer
        return state

    def host_side(superlink: subprocess.Popen) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """The SuperLink's SuperExec and ServerApp, and how they relate to it."""
        processes = tree(superlink.pid)
        superexecs, serverapps = named(processes, "flower-superexec"), named(processes, "flwr-serverapp")
        assert len(superexecs) == 1 and len(serverapps) == 1, [p.cmdline()[:2] for p in processes]
        assert serverapps[0].ppid() == superexecs[0].pid and superexecs[0].ppid() == superlink.pid
        assert os.getpgid(superexecs[0].pid) != os.getpgid(superlink.pid)  # a session of its own
        assert os.getpgid(serverapps[0].pid) == os.getpgid(superexecs[0].pid)
        return superexecs, serverapps

    def went_down(how: str) -> dict:
        """What the checkpoint held when the ServerApp died, and how many metrics.jsonl lines it covers."""
        state = checkpoint(run_dir)
        assert state is not None and 1 <= state["version"] < VERSIONS, logs()  # a fault mid-run, not after it
        raw = metrics.read_bytes()
        covered = raw[: state["journal_bytes"]]
        assert covered.endswith(b"\n")
        lines, after = covered.count(b"\n"), raw.count(b"\n") - covered.count(b"\n")
        note(
            f"{how} at {time.monotonic() - started:.0f} s: checkpoint version {state['version']}, "
            f"{len(state['buffer'])} buffered, counters {state['counters']}, task counter "
            f"{state['task_counter']}; {after} metrics line(s) after it"
        )
        return {
            "version": state["version"],
            "buffered": len(state["buffer"]),
            "accepted": state["counters"].get("accepted", 0),
            "lines": lines,
        }

    # --- the run, until a version is checkpointed (preferably with a half-full buffer) ----------------------
    run = flwr_run({})
    wait_for_checkpoint(0, grace=15)
    host_side(superlink)

    # --- 1. the host crashes: SuperLink, SuperExec and ServerApp (and `flwr run`) SIGKILLed at once ---------
    victims = [*tree(superlink.pid), *tree(run.pid)]
    for pgid in {os.getpgid(p.pid) for p in victims}:
        os.killpg(pgid, signal.SIGKILL)
    superlink.wait(10)
    run.wait(10)
    assert not psutil.wait_procs(victims, timeout=10)[1]
    downs = [went_down("host crash")]

    superlink = start_superlink()
    run = flwr_run({"resume": str(run_dir)})

    # --- 2. the SuperLink alone dies: its SuperExec exits, and the ServerApp (at the latest once the
    # SuperLink is back: its SIGINT waits until its main thread gets past Flower's Runtime API retries) ---
    wait_for_checkpoint(downs[-1]["version"])
    [superexec], [serverapp] = host_side(superlink)
    os.killpg(superlink.pid, signal.SIGKILL)  # superlink.sh's process group: the SuperLink only
    superlink.wait(10)  # reaped at once: a zombie would still count as alive to its children's poll
    killed_at = time.monotonic()
    with contextlib.suppress(psutil.TimeoutExpired):
        superexec.wait(20)
    assert not superexec.is_running(), "the SuperExec outlived its SuperLink by 20 s"
    note(f"  its SuperExec exited by itself {time.monotonic() - killed_at:.1f} s after the SuperLink")
    with contextlib.suppress(psutil.TimeoutExpired):
        serverapp.wait(max(0.0, 15 - (time.monotonic() - killed_at)))
    lingering = serverapp.is_running()
    if not lingering:
        note(f"  its ServerApp exited by itself {time.monotonic() - killed_at:.1f} s after the SuperLink")
    with contextlib.suppress(subprocess.TimeoutExpired):
        run.wait(10)
    note(f"  flwr run --stream: exit status {run.poll()} (None: still running, killed)")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(10)
    downs.append(went_down("SuperLink killed"))
    left = (checkpoint(run_dir), metrics.read_bytes())

    superlink = start_superlink()
    if lingering:
        back_at = time.monotonic()
        with contextlib.suppress(psutil.TimeoutExpired):
            serverapp.wait(30)
        assert not serverapp.is_running(), "the old ServerApp still runs 30 s after its SuperLink came back"
        note(
            f"  its ServerApp still ran 15 s after the SuperLink died; it exited "
            f"{time.monotonic() - back_at:.1f} s after the SuperLink was back"
        )
    assert (checkpoint(run_dir), metrics.read_bytes()) == left  # it wrote nothing after its SuperLink died
    run = flwr_run({"resume": str(run_dir)})

    # --- the resumed run finishes --------------------------------------------------------------------
    wait_for(lambda: run.poll() is not None, 240, "the resumed flwr run did not finish", logs)
    assert run.returncode == 0, logs()
    note(f"finished at {time.monotonic() - started:.0f} s")
    final = checkpoint(run_dir)
    every = metrics_lines(metrics)
    versions = [line["version"] for line in every if line["event"] == "version"]
    assert versions == list(range(VERSIONS + 1)), logs()  # none repeated, none missing
    accepted = [line for line in every if line["event"] == "update" and line["accepted"]]
    assert final["version"] == VERSIONS and final["buffer"] == [], final
    assert len(accepted) == final["counters"]["accepted"] == VERSIONS * K, logs()  # nothing counted twice
    counted = [line["counters"].get("accepted", 0) for line in every if line["event"] == "version"]
    assert counted == sorted(counted) and counted[-1] == VERSIONS * K
    # Each resumed run starts where its checkpoint ended: the lines up to it kept, the next version is
    # the checkpoint's + 1, and it takes only the K - (buffered) updates still missing.
    ends = [down["lines"] for down in downs[1:]] + [len(every)]
    for down, end in zip(downs, ends, strict=True):
        segment = every[down["lines"] : end]
        first_version = next(line for line in segment if line["event"] == "version")
        assert first_version["version"] == down["version"] + 1, segment
        assert first_version["counters"]["accepted"] == down["accepted"] + K - down["buffered"], segment
        assert all(line["version_sent"] >= down["version"] for line in segment if line["event"] == "update")
    # Every update came from the node id each facility's SuperNode was given at its one activation.
    node_of = {}
    for name in FACILITIES:
        [node_id] = re.findall(r"SuperNode ID: (\d+)", job_log(name).read_text(errors="replace"))
        node_of[name] = int(node_id)
    assert {(line["facility"], line["node"]) for line in every if line["event"] == "update"} == set(node_of.items())
    note(f"versions {versions}; {len(accepted)} accepted updates = final counter = {VERSIONS} x {K}")

    # The final adapter (PEFT) is the last version's global adapter, bit for bit.
    adapter = run_dir / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    run_config = resolve(json.loads((run_dir / "config.json").read_text()))
    lora_spec = LoraSpec.from_config(run_config)
    layout = adapter_layout(adapter_skeleton(ModelSpec.from_config(run_config), lora_spec), lora_spec)
    with np.load(run_dir / "checkpoint" / final["files"]["global"]) as last:  # the packed vector that travels
        assert last.files == ["adapter"] and sorted(tensors) == sorted(layout.names)
        assert np.array_equal(layout.pack(tensors), last["adapter"])

    # --- the SuperNodes were never restarted: same jobs, one activation each, and every run reached them -----
    assert not [e for e in read_events(launch / "launch.jsonl") if e["event"] == "resubmitted"]
    assert {name: entry["job_id"] for name, entry in read_state(launch)["facilities"].items()} == jobs
    for name in FACILITIES:
        text = job_log(name).read_text(errors="replace")
        assert "Connection attempt failed" in text, tail(job_log(name))  # they did lose the SuperLink
        # Each run's ServerApp asks every connected SuperNode which facility it serves, first thing: answered
        # by both SuperNodes in all three runs, i.e. after each restart.
        assert text.count("Receiving: query message") == len(run_logs), tail(job_log(name))
        waits = [
            line.split("Connection successful ")[1] for line in text.splitlines() if "Connection successful" in line
        ]
        note(f"  {name}: one activation (node id {node_of[name]}); retries that succeeded: {'; '.join(waits)}")
    listed = subprocess.run(
        [str(BIN / "flwr"), "list", "chemfl-test", "--format", "json"],
        capture_output=True,
        text=True,
        env={**env, "FLWR_HOME": str(cli_home)},
        timeout=60,
    )
    with contextlib.suppress(ValueError, KeyError):
        runs = json.loads(listed.stdout)["runs"]
        note("flwr list: " + ", ".join(f"{run['run-id']} {run['status']}" for run in runs))

    assert main(["launch", "stop", str(launch)]) == 0
    wait_for(lambda: watcher.poll() is not None, 30, "the watcher did not exit", logs)
    note(f"whole test {time.monotonic() - started:.0f} s")
