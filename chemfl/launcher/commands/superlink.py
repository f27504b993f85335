"""`chemfl launch superlink`: the SuperLink side of a deployment, written once every input is checked:
certificates, SuperNode keys, superlink.sh, (exposure fleet-only, the default) proxy.conf and proxy.sh,
the flwr connection, and superlink.json for `launch register`.

Exposure (the facilities file's `[superlink] exposure`): flwr 1.42 serves the Fleet, Control and Runtime
APIs on one port and the Control API has no accounts, so whoever reaches that port can run code on every
SuperNode. "fleet-only" binds the SuperLink to 127.0.0.1:<internal port> and puts nginx on the public
port, forwarding only the Fleet API (chemfl.launcher.proxy); `flwr run` and `launch register` then go
to 127.0.0.1:<internal port> on the SuperLink host, or through an SSH tunnel to it. "direct" is the
SuperLink itself on the port, for studies on one machine: refused on a non-local address or bind
unless --expose-control-api."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically
from chemfl.launcher import proxy
from chemfl.launcher import superlink as sl
from chemfl.launcher.cli import DEFAULT_CONNECTION
from chemfl.launcher.commands.paths import shown
from chemfl.launcher.facilities import (
    LaunchPlan,
    SuperLinkTarget,
    load_facilities,
    supernode_count,
    supernode_key_name,
)

SETUP_FILE = "superlink.json"  # what `launch superlink` set up, for `launch register`
SCRIPT_FILE = "superlink.sh"
CERTS_DIR, KEYS_DIR, DATABASE = "certs", "keys", "state.db"


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
    exposure: str = "direct"  # "fleet-only": nginx on `port`, the SuperLink on 127.0.0.1:internal_port
    internal_port: int | None = None  # fleet-only: where the SuperLink listens (127.0.0.1)

    @property
    def superlink_port(self) -> int:
        """The port flower-superlink itself listens on."""
        return self.internal_port if self.exposure == "fleet-only" and self.internal_port else self.port

    @property
    def proxy_script(self) -> Path | None:
        return self.out / proxy.SCRIPT_FILE if self.exposure == "fleet-only" else None

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
            "exposure": self.exposure,
            "internal_port": self.internal_port,
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
            exposure=data.get("exposure", "direct"),  # set-ups written before the proxy were direct
            internal_port=data.get("internal_port"),
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
    bind: str | None = None,
    connection: str = DEFAULT_CONNECTION,
    connection_address: str | None = None,
    flwr_home: Path | None = None,
    *,
    internal_port: int | None = None,
    expose_control_api: bool = False,
) -> SuperLinkSetup:
    """Everything `chemfl launch superlink` writes; every input is checked before the first file.

    `port` is the public port SuperNodes reach: nginx's (exposure fleet-only) or flower-superlink's
    (direct). `bind` is where that port listens (default: every interface for fleet-only, 127.0.0.1 for a
    direct SuperLink on a local address). `internal_port` (fleet-only) is the SuperLink's on 127.0.0.1.
    """
    plan = load_facilities(facilities_file)
    target = plan.superlink
    _check_target_expects_own_ca(target, facilities_file)
    address_host, _ = sl.parse_address(target.address)
    hosts = _certificate_hosts(hosts or [address_host], address_host, target.address)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ChemFLError(f"--port {port} is not a TCP port: give 1-65535 (default 8000)")
    fleet_only = target.exposure == "fleet-only"
    if fleet_only:
        bind = bind or "0.0.0.0"
        internal_port = proxy.INTERNAL_DEFAULT_PORT if internal_port is None else internal_port
        if not isinstance(internal_port, int) or not 0 < internal_port < 65536:
            raise ChemFLError(f"--internal-port {internal_port} is not a TCP port: give 1-65535 (default 9093)")
        if internal_port == port:
            raise ChemFLError(
                f"--internal-port and --port are both {port}: the SuperLink (127.0.0.1) and the proxy need "
                f"their own ports; keep --port {port} for the SuperNodes and give another --internal-port"
            )
        if expose_control_api:
            raise ChemFLError(
                f'--expose-control-api applies to exposure = "direct" only; {facilities_file} asks for '
                '"fleet-only", where the Control API stays on 127.0.0.1'
            )
    else:
        if internal_port is not None:
            raise ChemFLError(
                f'--internal-port applies to exposure = "fleet-only" only; {facilities_file} asks for "direct" '
                "(one port, --port, for everything)"
            )
        bind = bind or ("127.0.0.1" if sl._is_local(address_host) else "0.0.0.0")
        _check_direct_exposure(facilities_file, target.address, address_host, bind, port, expose_control_api)
    if bind not in ("0.0.0.0", "::"):
        sl._check_host(bind)
    sl._check_connection_name(connection)
    if connection_address is None:
        connection_address = (
            f"127.0.0.1:{internal_port}"
            if fleet_only
            else (f"[{address_host}]:{port}" if ":" in address_host else f"{address_host}:{port}")
        )
    sl.parse_address(connection_address)
    flwr_home = Path(flwr_home).expanduser() if flwr_home is not None else default_flwr_home()
    _check_flwr_config(flwr_home / sl.FLOWER_CONFIG_FILE)
    supernodes = _supernode_names(plan) if target.keys_dir else {}
    out = Path(out).resolve()
    _check_kept_credentials(out, supernodes)
    if fleet_only:
        assert internal_port is not None
        config = proxy.proxy_config(bind=bind, port=port, internal_port=internal_port, address=target.address)

    # Checked: now write.
    certificates = sl.make_certificates(out / CERTS_DIR, hosts)
    if supernodes:
        sl.make_supernode_keys(out / KEYS_DIR, [name for names in supernodes.values() for name in names])
    command = sl.superlink_command(
        certificates=certificates,
        database=out / DATABASE,
        host="127.0.0.1" if fleet_only else bind,
        port=internal_port if fleet_only and internal_port else port,
        enable_supernode_auth=bool(supernodes),
    )
    script = out / SCRIPT_FILE
    write_file_atomically(
        script,
        superlink_script(command, out, target.address, bool(supernodes), public_port=port if fleet_only else None),
        0o755,
    )
    if fleet_only:
        assert internal_port is not None
        write_file_atomically(out / proxy.CONFIG_FILE, config, 0o644)
        write_file_atomically(
            out / proxy.SCRIPT_FILE,
            proxy.proxy_script(address=target.address, port=port, internal_port=internal_port),
            0o755,
        )
    else:
        # A set-up switched to direct must not leave a proxy script that no longer matches superlink.sh.
        for name in (proxy.CONFIG_FILE, proxy.SCRIPT_FILE):
            (out / name).unlink(missing_ok=True)
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
        exposure=target.exposure,
        internal_port=internal_port if fleet_only else None,
    )
    write_file_atomically(out / SETUP_FILE, json.dumps(setup.to_json(), indent=2) + "\n", 0o644)
    return setup


def _is_loopback(bind: str) -> bool:
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return bind.lower() == "localhost"


def _check_direct_exposure(
    facilities_file: Path, address: str, address_host: str, bind: str, port: int, expose_control_api: bool
) -> None:
    """exposure = "direct" puts the Control API (flwr run: code every SuperNode executes) on the port:
    only for a SuperLink that nothing but this machine reaches, unless explicitly overridden."""
    if expose_control_api or (sl._is_local(address_host) and _is_loopback(bind)):
        return
    where = f"SuperNodes connect to {address}" if not sl._is_local(address_host) else f"--bind {bind}"
    raise ChemFLError(
        f'{facilities_file}: exposure = "direct" puts the SuperLink\'s Control API on port {port}, and {where}: '
        "anyone who reaches that port could start runs whose code every SuperNode executes (Flower has no "
        'accounts on it). Remove exposure (the default "fleet-only" puts a proxy on the port that forwards '
        "only the Fleet API), or, if only trusted machines can reach the port, pass --expose-control-api"
    )


def _check_target_expects_own_ca(target: SuperLinkTarget, facilities_file: Path) -> None:
    """The SuperLink set up here speaks TLS with its own CA: SuperNodes told otherwise could not connect."""
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


def _certificate_hosts(hosts: list[str], address_host: str, address: str) -> list[str]:
    """The checked hosts; they must include the one SuperNodes dial, or every TLS check would fail."""
    hosts = [sl._check_host(host) for host in hosts]
    if sl._check_host(address_host) not in hosts:
        raise ChemFLError(
            f"the facilities file sends SuperNodes to {address}, but the certificate would name only "
            f"{', '.join(hosts)}, so their TLS check would fail; add --host {address_host}"
        )
    return hosts


def _check_flwr_config(config_file: Path) -> None:
    """write_connection would refuse a broken config.toml only after the certificates are written."""
    if config_file.is_file():
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ChemFLError(
                f"{config_file} is not valid TOML ({err}); fix it, or pass --flwr-home elsewhere"
            ) from None


def _supernode_names(plan: LaunchPlan) -> dict[str, list[str]]:
    """facility -> the key names of its SuperNodes, as the facilities' scripts will look them up."""
    return {
        facility.name: [supernode_key_name(facility.name, i) for i in range(supernode_count(facility))]
        for facility in plan.facilities
    }


def _check_kept_credentials(out: Path, supernodes: dict[str, list[str]]) -> None:
    """Keys and a CA kept from an earlier run must still be usable: found broken half-way through the
    writes, they would leave a half-renewed set-up."""
    for names in supernodes.values():
        for name in names:
            _check_existing_key(out / KEYS_DIR / name)
    ca_key = out / CERTS_DIR / sl.CA_KEY
    if (out / CERTS_DIR / sl.CA_CERT).exists() and not ca_key.exists():
        raise ChemFLError(
            f"{out / CERTS_DIR / sl.CA_CERT} exists without its key {ca_key}: put the key back, or "
            f"move {out / CERTS_DIR} away for a new CA (then copy the new ca.crt to every facility)"
        )


def _check_existing_key(path: Path) -> None:
    """A key kept from an earlier run must still load (make_supernode_keys would fail half-way)."""
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


def superlink_script(
    command: list[str], out: Path, address: str, authentication: bool, *, public_port: int | None = None
) -> str:
    """superlink.sh: the command with paths relative to the script's folder, so the folder can move.
    `public_port`: exposure fleet-only, the port proxy.sh serves (the SuperLink is on 127.0.0.1)."""
    prefix = str(out) + os.sep

    def word(arg: str) -> str:
        if arg.startswith(prefix):
            return '"$here/' + arg.removeprefix(prefix) + '"'
        return shlex.quote(arg)

    port = command[command.index("--port") + 1]
    if public_port is None:
        exposure = [
            f"# ChemFL SuperLink: SuperNodes connect to {address}. One HTTPS port ({port}) serves the SuperNodes,",
            "# `flwr run` and `flwr supernode register`, and whoever reaches it can start runs (code every SuperNode",
            '# executes) and register keys (exposure = "direct"): open it to no one but this machine.',
        ]
    else:
        exposure = [
            f"# ChemFL SuperLink on 127.0.0.1:{port} only (exposure fleet-only): SuperNodes connect to",
            f"# {address}, where proxy.sh (nginx, port {public_port}) forwards only their Fleet API calls here.",
            f"# `flwr run`, `flwr ls` and `chemfl launch register` use 127.0.0.1:{port} on this host, or",
            f"# ssh -N -L {port}:127.0.0.1:{port} to it.",
        ]
    lines = [
        "#!/bin/bash",
        *exposure,
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


def run(args: argparse.Namespace) -> int:
    setup = prepare_superlink(
        args.facilities,
        args.out,
        args.host,
        args.port,
        args.bind,
        args.connection,
        args.connection_address,
        args.flwr_home,
        internal_port=args.internal_port,
        expose_control_api=args.expose_control_api,
    )
    out = shown(setup.out)
    fleet_only = setup.exposure == "fleet-only"
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
    if fleet_only:
        print(
            f"\nExposure fleet-only: the SuperLink listens on 127.0.0.1:{setup.internal_port} only; "
            f"{out}/{proxy.SCRIPT_FILE} runs nginx ({out}/{proxy.CONFIG_FILE}) on {setup.bind}:{setup.port} with the "
            "same certificate and "
            "forwards only the Fleet API (what SuperNodes call); `flwr run`, `flwr ls` and key registration sent "
            "there are refused (403)."
        )
    else:
        print(
            f"\nExposure direct: port {setup.port} on {setup.bind} also serves the Control API: whoever reaches it can "
            "start runs whose code every SuperNode executes."
        )
    print("\nCopy to each facility (destinations are the facilities file's paths, AT that facility):")
    for facility, names in (setup.supernodes or {name: [] for name in _facility_names(setup)}).items():
        print(f"  {facility}: {out}/certs/ca.crt -> {setup.root_certificates_at_facilities}")
        if names:
            keys = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
            print(f"  {' ' * len(facility)}  {out}/keys/{keys} -> {setup.keys_dir_at_facilities}/ (private: chmod 600)")
    print(f"  Keep {out}/certs/ca.key and server.key on the SuperLink host only.")
    print("\nNext:")
    started = f"{out}/{SCRIPT_FILE} and {out}/{proxy.SCRIPT_FILE}" if fleet_only else f"{out}/{SCRIPT_FILE}"
    print(
        f"  1. on {setup.hosts[0]}: {started}   (keep {'both' if fleet_only else 'it'} running: tmux, nohup or a "
        f"service; open port {setup.port} only to the facilities)"
    )
    address_port = setup.address.rpartition(":")[2]
    if address_port != str(setup.port):
        print(
            f"     SuperNodes connect to port {address_port} ({setup.address}): forward it to {setup.port} on that "
            f"host, or pass --port {address_port} (below 1024 needs root or CAP_NET_BIND_SERVICE)"
        )
    here = " on the SuperLink host" if fleet_only else ""
    if setup.supernodes:
        print(f"  2. once it runs{here}: chemfl launch register {out}")
    print(
        f"  {3 if setup.supernodes else 2}. chemfl launch submit {shown(setup.facilities_file)} --dry-run, "
        "then without --dry-run (add --watch to keep the jobs alive)"
    )
    print(f"  Runs{here}: flwr run . {setup.connection} --run-config RECIPE.toml --stream")
    if fleet_only:
        print(
            f"  From another machine: ssh -N -L {setup.internal_port}:127.0.0.1:{setup.internal_port} "
            f"{setup.hosts[0]}, and there a connection '{setup.connection}' to 127.0.0.1:{setup.internal_port} "
            "with a copy of ca.crt "
            "(docs/run-across-facilities.md, section 3)"
        )
    return 0


def _facility_names(setup: SuperLinkSetup) -> list[str]:
    return [facility.name for facility in load_facilities(setup.facilities_file).facilities]
