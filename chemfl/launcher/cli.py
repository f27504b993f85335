"""`chemfl launch ...`: run the federation's SuperNodes as batch jobs at every facility.

    chemfl launch superlink FACILITIES.toml --host fl.example.org   # server side: certificates, keys,
                                                                    # superlink.sh, the flwr connection
    chemfl launch register server/                                  # once the SuperLink runs: register keys
    chemfl launch submit FACILITIES.toml --dry-run                  # render the batch scripts, read them
    chemfl launch submit FACILITIES.toml --watch                    # submit, resubmit ended jobs
    chemfl launch status launch/                                    # what every facility's job is doing
    chemfl launch stop launch/                                      # stop the watcher, cancel the jobs

Everything is checked (the facilities file, host names, the scheduler commands, the SuperLink's TLS
certificate) before any file is written or any job submitted; problems are ChemFLError messages
that name the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chemfl.data_prep.io import write_file_atomically
from chemfl.errors import ChemFLError
from chemfl.launcher.facilities import (
    Facility,
    LaunchPlan,
    load_facilities,
    supernode_count,
    supernode_key_name,
)

if TYPE_CHECKING:
    from chemfl.launcher.schedulers import JobTarget
    from chemfl.launcher.superlink import RegisterReport

SETUP_FILE = "superlink.json"  # what `launch superlink` set up, for `launch register`
SCRIPT_FILE = "superlink.sh"
CERTS_DIR, KEYS_DIR, DATABASE = "certs", "keys", "state.db"
DEFAULT_CONNECTION = "chemfl"
SUBMIT_COMMANDS = {"pbs": "qsub", "slurm": "sbatch", "local": "bash"}
HERE = "@HERE@"  # stands for superlink.sh's own folder while its command is built


def register(verbs: argparse._SubParsersAction) -> None:
    launch = verbs.add_parser(
        "launch",
        help="run SuperNodes as batch jobs at facilities: SuperLink set-up, submit, status, stop",
        description="Deploy ChemFL across facilities. Server side: `superlink` (certificates, SuperNode keys, "
        "superlink.sh, the flwr connection), then `register` once the SuperLink runs. Facility side: `submit` "
        "(one batch script per facility; --dry-run to read them first, --watch to resubmit ended jobs), "
        "`status`, `stop`. The facilities file is described in recipes/four-facilities/facilities.toml.",
    )
    actions = launch.add_subparsers(dest="action", required=True, metavar="{superlink,register,submit,status,stop}")

    superlink = actions.add_parser(
        "superlink",
        help="SuperLink side: TLS certificates, SuperNode keys, superlink.sh, the flwr connection",
        description="Writes OUT/certs (a CA and a server certificate for --host), OUT/keys (one key per SuperNode "
        "of every facility, named <facility>-<index>), OUT/superlink.sh (flower-superlink with TLS, SuperNode "
        "authentication, a database, runtime dependency installation off) and the flwr connection entry; prints "
        "what to copy to each facility. Rerunning keeps the CA and the keys (SuperNodes keep their identity) and "
        "renews the server certificate.",
    )
    superlink.add_argument("facilities", type=Path, metavar="FACILITIES.toml")
    superlink.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="NAME",
        help="DNS name or IP address the certificate is for, repeatable "
        "(default: the host of the facilities file's [superlink] address)",
    )
    superlink.add_argument(
        "--out",
        type=Path,
        default=Path("server"),
        help="folder for certificates, keys and superlink.sh (default: server)",
    )
    superlink.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port flower-superlink listens on (default: 8000, Flower's); it serves SuperNodes, `flwr run` and key "
        "registration alike",
    )
    superlink.add_argument(
        "--bind", default="0.0.0.0", help="address flower-superlink binds (default: 0.0.0.0, every interface)"
    )
    superlink.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        help="name of the flwr connection, for flwr run . NAME (default: chemfl)",
    )
    superlink.add_argument(
        "--connection-address",
        default=None,
        metavar="HOST:PORT",
        help="where `flwr run` and `register` reach the SuperLink (default: the [superlink] host with --port)",
    )
    superlink.add_argument(
        "--flwr-home",
        type=Path,
        default=None,
        help="Flower home holding the connection's config.toml (default: $FLWR_HOME or ~/.flwr)",
    )
    superlink.set_defaults(handler=run_superlink)

    register_keys = actions.add_parser(
        "register",
        help="register every SuperNode's public key with the running SuperLink",
        description="`flwr supernode register` for each key `chemfl launch superlink` wrote; keys the SuperLink "
        "already knows count as done, so it is safe to rerun.",
    )
    register_keys.add_argument("server", type=Path, metavar="SERVER_DIR", help="the --out of `chemfl launch superlink`")
    register_keys.add_argument(
        "--flwr-home",
        type=Path,
        default=None,
        help="Flower home holding the connection (default: the one `launch superlink` wrote)",
    )
    register_keys.set_defaults(handler=run_register)

    submit = actions.add_parser(
        "submit",
        help="render one batch script per facility and submit them (--dry-run: only render)",
        description="Checks the facilities file, the scheduler commands and the SuperLink (reachable from here, "
        "its certificate signed by the CA), writes OUT/<facility>.sh (and OUT/<facility>.body.sh, what a Globus "
        "endpoint runs), then submits each: qsub, sbatch or bash for backend = cli, a Globus Compute ShellFunction "
        "for backend = globus. Events go to OUT/launch.jsonl.",
    )
    submit.add_argument("facilities", type=Path, metavar="FACILITIES.toml")
    submit.add_argument(
        "--out",
        type=Path,
        default=Path("launch"),
        help="launch folder: scripts, job logs, launch.jsonl (default: launch)",
    )
    submit.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="launch only these facilities (repeatable, or comma-separated), e.g. the one whose "
        "login node this is (default: all)",
    )
    submit.add_argument("--dry-run", action="store_true", help="write the scripts, submit nothing, print how to")
    submit.add_argument(
        "--watch",
        action="store_true",
        help="stay and resubmit jobs that end (up to each facility's max-resubmits) until `chemfl launch stop`",
    )
    submit.add_argument(
        "--poll", type=float, default=30.0, metavar="SECONDS", help="--watch: seconds between job queries (default: 30)"
    )
    submit.add_argument(
        "--root-certificates",
        type=Path,
        default=None,
        metavar="CA",
        help="the CA certificate on this machine, for the SuperLink check (default: the facilities "
        "file's root-certificates, read here)",
    )
    submit.add_argument("--no-check", action="store_true", help="do not contact the SuperLink before submitting")
    submit.set_defaults(handler=run_submit)

    status = actions.add_parser("status", help="each facility's job, attempts and last event in a launch folder")
    status.add_argument("launch_dir", type=Path, metavar="LAUNCH_DIR")
    status.add_argument(
        "--events", type=int, default=0, metavar="N", help="also print the last N events of launch.jsonl"
    )
    status.set_defaults(handler=run_status)

    stop = actions.add_parser(
        "stop",
        help="stop the watcher and cancel every job of a launch",
        description="Tells the watcher to exit (launch.stop), waits for it, then cancels every queued or running job "
        "(qdel, scancel, or SIGTERM to a local job's process group). Globus Compute tasks cannot be cancelled: "
        "they end at their walltime.",
    )
    stop.add_argument("launch_dir", type=Path, metavar="LAUNCH_DIR")
    stop.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the watcher to exit (default: 60)",
    )
    stop.set_defaults(handler=run_stop)


# --- superlink -------------------------------------------------------------------------------------


@dataclass
class SuperLinkSetup:
    """What `launch superlink` wrote (also saved as OUT/superlink.json)."""

    out: Path
    facilities_file: Path
    address: str  # where SuperNodes connect (the facilities file's)
    hosts: list[str]
    port: int
    bind: str
    connection: str
    connection_address: str
    flwr_home: Path
    ca_cert: Path
    script: Path
    command: list[str]  # flower-superlink argv with absolute paths
    supernodes: dict[str, list[str]] = field(default_factory=dict)  # facility -> key names
    root_certificates_at_facilities: str = ""
    keys_dir_at_facilities: str = ""

    def public_keys(self) -> list[Path]:
        return [self.out / KEYS_DIR / f"{name}.pub" for names in self.supernodes.values() for name in names]

    def to_json(self) -> dict:
        return {
            "facilities_file": str(self.facilities_file),
            "address": self.address,
            "hosts": self.hosts,
            "port": self.port,
            "bind": self.bind,
            "connection": self.connection,
            "connection_address": self.connection_address,
            "flwr_home": str(self.flwr_home),
            "command": self.command,
            "supernodes": self.supernodes,
            "root_certificates_at_facilities": self.root_certificates_at_facilities,
            "keys_dir_at_facilities": self.keys_dir_at_facilities,
        }

    @classmethod
    def load(cls, out: Path) -> SuperLinkSetup:
        path = Path(out) / SETUP_FILE
        if not path.is_file():
            raise ChemFLError(
                f"{out} holds no SuperLink set-up (no {SETUP_FILE}); run chemfl launch superlink "
                f"FACILITIES.toml --out {out} first"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        out = path.parent.resolve()
        return cls(
            out=out,
            facilities_file=Path(data["facilities_file"]),
            address=data["address"],
            hosts=data["hosts"],
            port=data["port"],
            bind=data["bind"],
            connection=data["connection"],
            connection_address=data["connection_address"],
            flwr_home=Path(data["flwr_home"]),
            ca_cert=out / CERTS_DIR / "ca.crt",
            script=out / SCRIPT_FILE,
            command=data["command"],
            supernodes=data["supernodes"],
            root_certificates_at_facilities=data["root_certificates_at_facilities"],
            keys_dir_at_facilities=data["keys_dir_at_facilities"],
        )


def default_flwr_home() -> Path:
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def flwr_executable(name: str) -> str:
    """`name` beside this Python (the venv's), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ChemFLError(f"`{name}` is not installed here; install flwr (pip install -e . in the chemfl checkout)")
    return found


def prepare_superlink(
    facilities_file: Path,
    out: Path,
    hosts: list[str] | None = None,
    port: int = 8000,
    bind: str = "0.0.0.0",
    connection: str = DEFAULT_CONNECTION,
    connection_address: str | None = None,
    flwr_home: Path | None = None,
) -> SuperLinkSetup:
    """Everything `chemfl launch superlink` writes; every input is checked before the first file."""
    from chemfl.launcher import superlink as sl

    plan = load_facilities(facilities_file)
    target = plan.superlink
    if target.insecure:
        raise ChemFLError(
            f"{facilities_file}: [superlink] insecure = true, but chemfl launch superlink sets up a TLS SuperLink; "
            'set insecure = false and root-certificates = "<where ca.crt will be at the facilities>" (for a plain '
            "local test, start flower-superlink --insecure --host 127.0.0.1 yourself)"
        )
    if not target.root_certificates:
        raise ChemFLError(
            f'{facilities_file}: [superlink] root-certificates = "" means a certificate from a public CA, but chemfl '
            'launch superlink makes its own CA; set root-certificates = "~/chemfl/certs/ca.crt" (where you will copy '
            "ca.crt at each facility), or start flower-superlink with your public certificate yourself"
        )
    address_host, _ = sl.parse_address(target.address)
    hosts = [sl._check_host(host) for host in (hosts or [address_host])]
    if sl._check_host(address_host) not in hosts:
        raise ChemFLError(
            f"the facilities file sends SuperNodes to {target.address}, but the certificate would name only "
            f"{', '.join(hosts)}, so their TLS check would fail; add --host {address_host}"
        )
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ChemFLError(f"--port {port} is not a TCP port: give 1-65535 (default 8000)")
    if bind not in ("0.0.0.0", "::"):
        sl._check_host(bind)
    sl._check_connection_name(connection)
    connection_address = connection_address or (
        f"[{address_host}]:{port}" if ":" in address_host else f"{address_host}:{port}"
    )
    sl.parse_address(connection_address)
    flwr_home = Path(flwr_home).expanduser() if flwr_home is not None else default_flwr_home()
    config_file = flwr_home / sl.FLOWER_CONFIG_FILE
    if config_file.is_file():
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ChemFLError(
                f"{config_file} is not valid TOML ({err}); fix it, or pass --flwr-home elsewhere"
            ) from None
    supernodes = (
        {
            facility.name: [supernode_key_name(facility.name, i) for i in range(supernode_count(facility))]
            for facility in plan.facilities
        }
        if target.keys_dir
        else {}
    )
    out = Path(out).resolve()
    for names in supernodes.values():
        for name in names:
            _check_existing_key(out / KEYS_DIR / name)
    ca_key = out / CERTS_DIR / sl.CA_KEY
    if (out / CERTS_DIR / sl.CA_CERT).exists() and not ca_key.exists():
        raise ChemFLError(
            f"{out / CERTS_DIR / sl.CA_CERT} exists without its key {ca_key}: put the key back, or "
            f"move {out / CERTS_DIR} away for a new CA (then copy the new ca.crt to every facility)"
        )

    # Checked: now write.
    certificates = sl.make_certificates(out / CERTS_DIR, hosts)
    if supernodes:
        sl.make_supernode_keys(out / KEYS_DIR, [name for names in supernodes.values() for name in names])
    command = sl.superlink_command(
        certificates=certificates,
        database=out / DATABASE,
        host=bind,
        port=port,
        enable_supernode_auth=bool(supernodes),
    )
    script = out / SCRIPT_FILE
    write_file_atomically(script, superlink_script(command, out, target.address, bool(supernodes)), 0o755)
    sl.write_connection(flwr_home, connection, connection_address, certificates.ca_cert, False)
    setup = SuperLinkSetup(
        out=out,
        facilities_file=Path(facilities_file).resolve(),
        address=target.address,
        hosts=hosts,
        port=port,
        bind=bind,
        connection=connection,
        connection_address=connection_address,
        flwr_home=flwr_home.resolve(),
        ca_cert=certificates.ca_cert,
        script=script,
        command=command,
        supernodes=supernodes,
        root_certificates_at_facilities=target.root_certificates,
        keys_dir_at_facilities=target.keys_dir,
    )
    write_file_atomically(out / SETUP_FILE, json.dumps(setup.to_json(), indent=2) + "\n", 0o644)
    return setup


def _check_existing_key(path: Path) -> None:
    """A key kept from an earlier run must still load (make_supernode_keys would fail half-way)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        return
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError) as err:
        raise ChemFLError(
            f"{path} exists but is not an unencrypted OpenSSH private key ({err}); move it away to "
            "give that SuperNode a new identity, or restore the original"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ChemFLError(
            f"{path} is not an EC key, which flower-supernode requires; move it away to give that "
            "SuperNode a new identity"
        )


def superlink_script(command: list[str], out: Path, address: str, authentication: bool) -> str:
    """superlink.sh: the command with paths relative to the script's folder, so the folder can move."""
    prefix = str(out) + os.sep

    def word(arg: str) -> str:
        if arg.startswith(prefix):
            return '"$here/' + arg.removeprefix(prefix) + '"'
        return shlex.quote(arg)

    port = command[command.index("--port") + 1]
    lines = [
        "#!/bin/bash",
        f"# ChemFL SuperLink: SuperNodes connect to {address}. One HTTPS port ({port}) serves the SuperNodes,",
        "# `flwr run` and `flwr supernode register`, and whoever reaches it can start runs and register keys:",
        "# open it only to the facilities' networks and your own machine.",
        "# "
        + (
            "SuperNodes must present a registered key (chemfl launch register)."
            if authentication
            else "SuperNode authentication is OFF (keys-dir is empty): any SuperNode that reaches the port joins."
        ),
        "# Relative paths in a run's config (data.path, outputs.dir, model.cache-dir) resolve against the folder",
        "# this script is started from: start it from your chemfl checkout, or give absolute paths.",
        "set -euo pipefail",
        'here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1  # the environment is complete: no uv sync",
        "# The SuperLink's own SuperExec reaches it on 127.0.0.1: never through a proxy.",
        'export no_proxy="localhost,127.0.0.1,::1${no_proxy:+,$no_proxy}"',
        'export NO_PROXY="localhost,127.0.0.1,::1${NO_PROXY:+,$NO_PROXY}"',
        "exec " + " \\\n  ".join(_pairs([word(arg) for arg in command])),
        "",
    ]
    return "\n".join(lines)


def _pairs(words: list[str]) -> list[str]:
    """`flower-superlink --flag value --flag` -> one line per option (with its value)."""
    lines: list[str] = [words[0]]
    for item in words[1:]:
        if item.startswith("--") or len(lines) == 1:
            lines.append(item)
        else:
            lines[-1] += " " + item
    return lines


def run_superlink(args: argparse.Namespace) -> int:
    setup = prepare_superlink(
        args.facilities,
        args.out,
        args.host,
        args.port,
        args.bind,
        args.connection,
        args.connection_address,
        args.flwr_home,
    )
    out = _shown(setup.out)
    print(f"{out}/certs: CA and server certificate for {', '.join(setup.hosts)} (+ localhost, 127.0.0.1)")
    total = sum(len(names) for names in setup.supernodes.values())
    if setup.supernodes:
        print(
            f"{out}/keys: {total} SuperNode keys, "
            + ", ".join(f"{facility} {len(names)}" for facility, names in setup.supernodes.items())
        )
    else:
        print(
            "keys-dir is empty in the facilities file: SuperNode authentication is OFF, so anyone who can reach "
            f"port {setup.port} can join as a SuperNode"
        )
    print(f"flwr connection '{setup.connection}' -> {setup.connection_address} in {setup.flwr_home}/config.toml")
    print(f"\nThe SuperLink command (in {out}/{SCRIPT_FILE}):\n  " + shlex.join(setup.command))
    print("\nCopy to each facility (destinations are the facilities file's paths, AT that facility):")
    for facility, names in (setup.supernodes or {name: [] for name in _facility_names(setup)}).items():
        print(f"  {facility}: {out}/certs/ca.crt -> {setup.root_certificates_at_facilities}")
        if names:
            keys = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            print(f"  {' ' * len(facility)}  {out}/keys/{keys} -> {setup.keys_dir_at_facilities}/ (private: chmod 600)")
    print(f"  Keep {out}/certs/ca.key and server.key on the SuperLink host only.")
    print("\nNext:")
    print(
        f"  1. on {setup.hosts[0]}: {out}/{SCRIPT_FILE}   (keep it running: tmux, nohup or a service; "
        f"open port {setup.port} only to the facilities)"
    )
    address_port = setup.address.rpartition(":")[2]
    if address_port != str(setup.port):
        print(
            f"     SuperNodes connect to port {address_port} ({setup.address}): forward it to {setup.port} on that "
            f"host, or pass --port {address_port} (below 1024 needs root or CAP_NET_BIND_SERVICE)"
        )
    if setup.supernodes:
        print(f"  2. once it runs: chemfl launch register {out}")
    print(
        f"  {3 if setup.supernodes else 2}. chemfl launch submit {_shown(setup.facilities_file)} --dry-run, "
        "then without --dry-run (add --watch to keep the jobs alive)"
    )
    print(f"  Runs: flwr run . {setup.connection} --run-config RECIPE.toml --stream")
    return 0


def _facility_names(setup: SuperLinkSetup) -> list[str]:
    return [facility.name for facility in load_facilities(setup.facilities_file).facilities]


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- register --------------------------------------------------------------------------------------


def register_keys(server: Path, flwr_home: Path | None = None) -> RegisterReport:
    """`flwr supernode register` for each key of the set-up in `server`; returns the RegisterReport."""
    from chemfl.launcher.superlink import check_superlink, register_supernodes

    setup = SuperLinkSetup.load(server)
    if not setup.supernodes:
        raise ChemFLError(
            f"{server}: no SuperNode keys (the facilities file's keys-dir is empty), so nothing to register"
        )
    missing = [key for key in setup.public_keys() if not key.is_file()]
    if missing:
        raise ChemFLError(
            f"{missing[0]} is missing; rerun chemfl launch superlink {setup.facilities_file} --out {server}"
        )
    try:
        check_superlink(setup.connection_address, setup.ca_cert, insecure=False)
    except ChemFLError as error:
        raise ChemFLError(f"{error} (start {setup.script} first, then register)") from None
    return register_supernodes(
        setup.public_keys(), setup.connection, flwr_home=flwr_home or setup.flwr_home, flwr=flwr_executable("flwr")
    )


def run_register(args: argparse.Namespace) -> int:
    report = register_keys(args.server, args.flwr_home)
    if report.registered:
        print("registered: " + ", ".join(report.registered))
    if report.already_registered:
        print("already registered: " + ", ".join(report.already_registered))
    if report.failed:
        details = "; ".join(f"{name}: {output}" for name, output in report.failed.items())
        raise ChemFLError(
            f"{len(report.failed)} key(s) not registered ({details}); fix the cause and rerun "
            "chemfl launch register (keys already registered are skipped)"
        )
    return 0


# --- submit ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    facility: Facility
    script: Path  # <facility>.sh: the batch script
    body: Path | None  # <facility>.body.sh: what a Globus endpoint runs (backend = globus only)


def select_facilities(plan: LaunchPlan, only: list[str] | None) -> list[Facility]:
    if not only:
        return list(plan.facilities)
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    known = {facility.name: facility for facility in plan.facilities}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ChemFLError(f"--only {', '.join(unknown)}: no such facility in the file; it has {', '.join(known)}")
    return [facility for facility in plan.facilities if facility.name in names]


def check_launch_dir(launch_dir: Path) -> None:
    """Refuse a folder whose earlier launch may still have jobs or a watcher: a second copy would double them."""
    from chemfl.launcher.watch import LIVE_STATES, read_state, watcher_pid

    if not (Path(launch_dir) / "launch-state.json").is_file():
        return
    live = {
        name: entry
        for name, entry in read_state(launch_dir)["facilities"].items()
        if entry["state"] in (*LIVE_STATES, "waiting", "new")
    }
    if watcher_pid(launch_dir) is not None or live:
        jobs = ", ".join(f"{name} {entry['state']} {entry['job_id'] or ''}".rstrip() for name, entry in live.items())
        raise ChemFLError(
            f"{launch_dir} holds a launch that may still run ({jobs or 'its watcher is running'}); "
            f"stop it first (chemfl launch stop {launch_dir}) or pick another --out"
        )


def check_schedulers(facilities: list[Facility]) -> None:
    from chemfl.launcher.schedulers import require_on_path

    for facility in facilities:
        if facility.backend == "cli":
            try:
                require_on_path(SUBMIT_COMMANDS[facility.profile.scheduler])
            except ChemFLError as error:
                raise ChemFLError(
                    f"facility {facility.name}: {error} (or --dry-run to only write the scripts, "
                    f"or --only the facilities this machine can submit to)"
                ) from None
        # A local job runs with this environment: without setup lines, flower-supernode must be on PATH here.
        if facility.profile.scheduler == "local" and not facility.setup and shutil.which("flower-supernode") is None:
            raise ChemFLError(
                f"facility {facility.name}: its job runs flower-supernode, which is not on PATH here; "
                "activate the environment chemfl is installed in (source .venv/bin/activate), or add "
                'setup = ["source /path/to/.venv/bin/activate"] to the facility'
            )


def check_superlink_from_here(plan: LaunchPlan, root_certificates: Path | None) -> str:
    """check_superlink with the CA as found on this machine; returns what was checked."""
    from chemfl.launcher.superlink import check_superlink

    target = plan.superlink
    if target.insecure:
        check_superlink(target.address, None, insecure=True)
        return f"SuperLink {target.address} reachable (insecure, local)"
    ca = root_certificates
    if ca is None and target.root_certificates:
        ca = Path(os.path.expandvars(os.path.expanduser(target.root_certificates)))
    if ca is not None and not ca.is_file():
        raise ChemFLError(
            f"the SuperLink check needs the CA certificate here, but {ca} does not exist on this machine; pass "
            "--root-certificates <local copy of ca.crt>, or --no-check to skip the check"
        )
    check_superlink(target.address, ca, insecure=False)
    return f"SuperLink {target.address} reachable from here, its certificate verified by {ca or 'the system CAs'}"


def write_launch_scripts(plan: LaunchPlan, facilities: list[Facility], launch_dir: Path) -> list[Rendered]:
    """<facility>.sh for each facility (rendered against the whole plan, so local runtime ports stay
    distinct with --only), and <facility>.body.sh for Globus facilities."""
    from chemfl.launcher.render import render_body, render_script

    launch_dir = Path(launch_dir).resolve()
    launch_dir.mkdir(parents=True, exist_ok=True)
    rendered = []
    for facility in facilities:
        script = launch_dir / f"{facility.name}.sh"
        write_file_atomically(script, render_script(plan, facility), 0o755)
        body = None
        if facility.backend == "globus":
            body = launch_dir / f"{facility.name}.body.sh"
            write_file_atomically(body, render_body(plan, facility), 0o755)
        rendered.append(Rendered(facility, script, body))
    return rendered


def job_targets(plan: LaunchPlan, rendered: list[Rendered]) -> list[JobTarget]:
    from chemfl.launcher.render import render_body
    from chemfl.launcher.schedulers import JobTarget

    return [
        JobTarget(
            facility=item.facility.name,
            scheduler=item.facility.profile.scheduler,
            backend=item.facility.backend,
            script=item.script,
            body=render_body(plan, item.facility),
            walltime_seconds=item.facility.walltime_seconds,
            max_resubmits=item.facility.max_resubmits,
            resubmit_backoff_seconds=item.facility.resubmit_backoff_seconds,
            globus_endpoint=item.facility.globus_endpoint,
            globus_config=dict(item.facility.globus_config),
        )
        for item in rendered
    ]


def run_submit(args: argparse.Namespace) -> int:
    from chemfl.launcher.watch import Watcher

    if args.poll <= 0:
        raise ChemFLError(f"--poll {args.poll}: give a positive number of seconds, e.g. 30")
    if args.dry_run and args.watch:
        raise ChemFLError("--dry-run submits nothing, so there is nothing to --watch; drop one of them")
    plan = load_facilities(args.facilities)
    facilities = select_facilities(plan, args.only)
    launch_dir = Path(args.out)
    check_launch_dir(launch_dir)
    if args.dry_run:
        checked = "SuperLink not checked (--dry-run)"
    else:
        check_schedulers(facilities)
        checked = (
            "SuperLink not checked (--no-check)"
            if args.no_check
            else check_superlink_from_here(plan, args.root_certificates)
        )
    rendered = write_launch_scripts(plan, facilities, launch_dir)
    print(checked)
    if args.dry_run:
        print_dry_run(args, rendered)
        return 0

    _log_events()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # a watcher's output is read live, often from a file
    watcher = Watcher(job_targets(plan, rendered), launch_dir, poll_seconds=args.poll)
    watcher.submit_all()
    for job in watcher.jobs:
        print(f"{job.target.facility}: {job.last_event} {job.job_id or ''} ({job.backend})".rstrip())
    if not args.watch:
        watcher.save(watching=False)  # no watcher follows these jobs
        for backend in watcher.backends.values():
            backend.close()
        print(
            f"Events in {_shown(launch_dir)}/launch.jsonl. Not watching: jobs that end are not resubmitted "
            f"(use --watch for that). chemfl launch status {_shown(launch_dir)} | "
            f"chemfl launch stop {_shown(launch_dir)}"
        )
        if any(job.backend == "globus" for job in watcher.jobs):
            print("Globus tasks can only be followed by the process that submitted them: use --watch for them.")
        return 0
    print(f"Watching (every {args.poll:g} s; chemfl launch stop {_shown(launch_dir)} ends it and cancels the jobs)")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        watcher.run()
    except KeyboardInterrupt:
        print(f"\nStopped watching; jobs keep running: chemfl launch stop {_shown(launch_dir)} cancels them")
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(
        "Watcher stopped" + (" (every facility gave up)" if all(job.state == "gave-up" for job in watcher.jobs) else "")
    )
    return 0


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # the watcher saves its state on the way out


def _log_events() -> None:
    logger = logging.getLogger("chemfl.launcher.watch")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def print_dry_run(args: argparse.Namespace, rendered: list[Rendered]) -> None:
    out = _shown(args.out)
    print(f"Nothing submitted (--dry-run). Read and edit the scripts in {out}/, then submit:")
    width = max(len(item.facility.name) for item in rendered)
    for item in rendered:
        facility = item.facility
        name = facility.name.ljust(width)
        script = item.script.name
        if facility.backend == "globus":
            print(
                f"  {name}  {out}/{item.body.name}: run by a Globus Compute ShellFunction on endpoint "
                f"{facility.globus_endpoint} ({out}/{script} for reference)"
            )
        elif facility.profile.scheduler == "local":
            print(f"  {name}  (cd {out} && nohup bash {script} > {facility.name}.log 2>&1 &)")
        else:
            print(
                f"  {name}  (cd {out} && {SUBMIT_COMMANDS[facility.profile.scheduler]} {script})   "
                f"on a login node of {facility.name}"
            )
    only = "".join(f" --only {item.facility.name}" for item in rendered) if args.only else ""
    print(
        f"Or let chemfl submit and keep them alive: chemfl launch submit {_shown(args.facilities)}{only} "
        f"--out {out} --watch"
    )


# --- status and stop -------------------------------------------------------------------------------


def run_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from chemfl.launcher.watch import EVENTS_FILE, queue_waits, read_events, read_state, status, watcher_pid

    _require_launch(args.launch_dir)
    rows = status(args.launch_dir)
    now = time.time()
    pid = watcher_pid(args.launch_dir)
    # Without a watcher the saved states age: ask the schedulers (read-only) what the jobs do now.
    current = {} if pid else current_states(rows)
    table = Table(title=f"{args.launch_dir}: {len(rows)} facilities")
    for column in ("facility", "backend", "job", "state", "attempts", "last event", "queue wait"):
        table.add_column(column, justify="right" if column in ("attempts", "queue wait") else "left")
    events_path = Path(args.launch_dir) / EVENTS_FILE
    waits = queue_waits(events_path) if events_path.is_file() else {}
    for row in rows:
        last = row["last_event"] or "-"
        if row["last_event_time"] is not None:
            last += f" ({_ago(now - row['last_event_time'])})"
        state = row["state"]
        if state == "waiting" and row["resubmit_at"] is not None:
            state += f" (resubmit in {max(0, round(row['resubmit_at'] - now))} s)"
        if current.get(row["facility"], state) != state:
            state += f", now {current[row['facility']]}"
        facility_waits = waits.get(row["facility"]) or []
        wait = f"{sum(facility_waits) / len(facility_waits):.0f} s" if facility_waits else "-"
        table.add_row(row["facility"], row["backend"], row["job_id"] or "-", state, str(row["attempts"]), last, wait)
    console = Console()
    if not console.is_terminal:  # logs and pipes: room for the table
        console.width = 120
    console.print(table)
    updated = _ago(now - read_state(args.launch_dir)["updated"])
    console.print(
        f"watcher: running (pid {pid}); states as of its last poll, {updated}"
        if pid
        else f"watcher: not running, so ended jobs are not resubmitted; states saved {updated}"
        + (", 'now' from the scheduler" if current else "")
    )
    if args.events and events_path.is_file():
        for event in read_events(events_path)[-args.events :]:
            extra = {
                k: v for k, v in event.items() if k not in ("time", "event", "facility", "backend", "job_id", "attempt")
            }
            stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            console.print(
                f"{stamp} {event['facility']} {event['event']} {event['job_id'] or ''} "
                f"{json.dumps(extra) if extra else ''}".rstrip(),
                markup=False,
                highlight=False,
            )
    return 0


def current_states(rows: list[dict]) -> dict[str, str]:
    """facility -> what its scheduler says of its saved live job now (qstat, squeue, the local pid).
    Globus tasks are left out: only the process that submitted one can follow it."""
    from chemfl.launcher.watch import LIVE_STATES, default_backends, describe

    backends = default_backends()
    states = {}
    for row in rows:
        if row["state"] in LIVE_STATES and row["job_id"] and row["backend"] != "globus":
            try:
                states[row["facility"]] = backends[row["backend"]].state(row["job_id"])
            except Exception as error:  # a status display must not fail on one facility's query
                states[row["facility"]] = f"unknown ({describe(error)})"
    return states


def _require_launch(launch_dir: Path) -> None:
    if not (Path(launch_dir) / "launch-state.json").is_file():
        raise ChemFLError(
            f"{launch_dir} holds no launch (no launch-state.json); give the --out of chemfl launch submit "
            "(default: launch)"
        )


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def run_stop(args: argparse.Namespace) -> int:
    from chemfl.launcher.watch import stop

    _require_launch(args.launch_dir)
    events = stop(args.launch_dir, wait_seconds=args.wait)
    if not events:
        print(f"{args.launch_dir}: nothing left to stop")
    for event in events:
        what = f"job {event['job_id']} cancelled" if event["job_id"] else "resubmission called off"
        print(f"{event['facility']}: {what}" + (f" ({event['note']})" if event["note"] else ""))
    return 0
