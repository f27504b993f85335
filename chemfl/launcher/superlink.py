"""The SuperLink side of a deployment: certificates, SuperNode keys, commands, connection, checks.

Checked against flwr 1.41 (site-packages/flwr is the ground truth):

- `flower-superlink` serves the Fleet, Control and Runtime APIs over HTTPS from ONE uvicorn server
  on `--host`/`--port` (default 127.0.0.1:8000, `flwr.supercore.constant`). `--fleet-api-address`
  and `--control-api-address` are deprecated no-ops. So SuperNodes (`--superlink`), `flwr run`
  (the connection's `address`) and `flwr supernode register` all use the same host:port.
- TLS: `--ssl-certfile/--ssl-keyfile` go to uvicorn; `--ssl-ca-certfile` is what the SuperLink's own
  SuperExec uses to reach the Runtime API on 127.0.0.1 (`resolve_bind_address` maps 0.0.0.0 to it),
  hence the server certificate always names localhost and 127.0.0.1.
- SuperNode auth (`--enable-supernode-auth`, refused together with `--insecure`): a SuperNode signs
  requests with a NIST-curve EC key read by `cryptography`'s `load_ssh_private_key`
  (`flwr/supernode/cli/flower_supernode.py::_try_setup_client_authentication`); its public key is
  registered with `flwr supernode register PUBKEY CONNECTION` (`flwr/cli/supernode/register.py`).
- Connections live in `$FLWR_HOME/config.toml` as `[superlink.<name>]` tables with `address`,
  `root-certificates` (absolute path) and `insecure` (`flwr/cli/flower_config.py`).
- The Control API has no account authentication in open-source Flower (`NoOpControlAuthnPlugin`
  unless `FLWR_OIDC_ENABLED=1` with an enterprise plugin) and shares the Fleet port: whoever can
  reach the port can start runs and register SuperNode keys. Restrict who can reach it.
- FAB signatures (`flower-supernode --trusted-entities`, a YAML `{fpk_<id>: 'ssh-ed25519 ...'}`)
  cannot protect a self-built app: a FAB sent by `flwr run .` is stored with empty verifications
  (`flwr/superlink/servicer/control/control_handlers.py::start_run`); only FABs fetched from the
  Flower Hub carry signatures (`_get_remote_fab`, signed via `flwr app review`, Hub only). A
  SuperNode with trusted entities then answers every message with "The FAB could not be
  verified" (`flwr/supernode/start_client_internal.py`). Tried here: that is what happens.
- A SuperNode whose key is still "online" (its previous process ended without deactivating less
  than 2 x 30 s heartbeats ago) is refused at activation and exits with code 305: retry later.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
import subprocess
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically

# flwr 1.41: SUPERLINK_UVICORN_DEFAULT_PORT (flwr/supercore/constant.py). One port for all APIs.
SUPERLINK_DEFAULT_PORT = 8000
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
FLOWER_CONFIG_FILE = "config.toml"  # flwr.cli.constant.FLOWER_CONFIG_FILE
CA_DAYS = 3650
SERVER_DAYS = 825
CLOCK_SKEW = dt.timedelta(minutes=5)  # facilities' clocks disagree a little
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONNECTION_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a bare TOML key
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_ALREADY_REGISTERED = "already in use"  # flwr: "Public key already in use while registering"


@dataclass(frozen=True)
class CertificatePaths:
    """Where make_certificates wrote the CA and the SuperLink's server certificate."""

    ca_cert: Path  # give to every SuperNode (--root-certificates) and to flwr (root-certificates)
    ca_key: Path  # keep on the SuperLink host only
    server_cert: Path  # flower-superlink --ssl-certfile
    server_key: Path  # flower-superlink --ssl-keyfile


@dataclass(frozen=True)
class KeyPair:
    """One SuperNode identity: OpenSSH EC private key and its `.pub`."""

    private_key: Path  # flower-supernode --auth-supernode-private-key
    public_key: Path  # flwr supernode register <public_key> <connection>


@dataclass
class RegisterReport:
    """What register_supernodes did, per SuperNode name."""

    registered: list[str] = field(default_factory=list)
    already_registered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> flwr's output

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------- files


def _is_local(host: str) -> bool:
    return host.strip("[]").lower() in LOCAL_HOSTS


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), else ChemFLError."""
    fix = "give it as host:port, e.g. 'superlink.example.org:8000' or '[::1]:8000', without https://"
    if not isinstance(address, str) or "://" in address or "/" in address:
        raise ChemFLError(f"SuperLink address {address!r} is not host:port: {fix}.")
    host, sep, port_text = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ChemFLError(f"SuperLink address {address!r} is not host:port: {fix}.")
    if ":" in host and not (bracketed and _is_ip(host)):
        raise ChemFLError(f"SuperLink address {address!r}: write an IPv6 host in brackets: {fix}.")
    return host, int(port_text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_host(host: str) -> str:
    """A bare DNS name or IP address (no port, no scheme), else ChemFLError."""
    host = host.strip()
    if _is_ip(host.strip("[]")):
        return host.strip("[]")
    labels = host.rstrip(".").split(".")
    if not host or not all(_DNS_LABEL.match(label) for label in labels):
        raise ChemFLError(
            f"host {host!r} is neither a DNS name nor an IP address: give the bare name the "
            "SuperNodes will connect to (e.g. 'login01.example.org' or '10.0.0.5'), without port or scheme."
        )
    return host.rstrip(".").lower()


# --------------------------------------------------------------------------- certificates


def make_certificates(
    out_dir: Path,
    hosts: list[str],
    *,
    replace_ca: bool = False,
    server_days: int = SERVER_DAYS,
) -> CertificatePaths:
    """Write a self-signed CA and a SuperLink server certificate it signs, for `hosts`.

    The server certificate's SubjectAltNames cover every host (DNS names and IP addresses) plus
    localhost and 127.0.0.1 (the SuperLink's own SuperExec connects there). An existing CA is
    kept and reused to sign a new server certificate (SuperNodes already trust it); `replace_ca`
    makes a new CA, which every SuperNode and flwr connection must then be given again.
    Private keys are written with mode 0600; every file is written to a temp file and renamed.
    """
    out_dir = Path(out_dir)
    paths = CertificatePaths(out_dir / CA_CERT, out_dir / CA_KEY, out_dir / SERVER_CERT, out_dir / SERVER_KEY)
    names = _san_hosts(hosts)
    now = dt.datetime.now(dt.UTC)
    if paths.ca_cert.exists() and not replace_ca:
        ca_cert, ca_key = _load_ca(paths)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _ca_certificate(ca_key, now)
        # Key first: a crash in between leaves no CA certificate without its key.
        write_file_atomically(paths.ca_key, _private_key_pem(ca_key), 0o600)
        write_file_atomically(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, names, ca_cert, ca_key, now, server_days)
    write_file_atomically(paths.server_key, _private_key_pem(server_key), 0o600)
    write_file_atomically(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*granted: str) -> x509.KeyUsage:
    """x509.KeyUsage with only the `granted` usages set (it wants every one spelled out)."""
    usages = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{**dict.fromkeys(usages, False), **dict.fromkeys(granted, True)})


def _ca_certificate(ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    """A CA that may sign server certificates only (path length 0), valid CA_DAYS."""
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chemfl SuperLink CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage("key_cert_sign", "crl_sign"), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    names: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    """A TLS server certificate for every one of `names`, signed by the CA and expiring no later than it."""
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in names
    ]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage("digital_signature", "key_agreement"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _san_hosts(hosts: Iterable[str]) -> list[str]:
    """Checked, de-duplicated hosts, the caller's first, then localhost and 127.0.0.1."""
    if isinstance(hosts, str):
        raise ChemFLError(f"hosts must be a list of host names, got the string {hosts!r}: wrap it in [].")
    names: list[str] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        checked = _check_host(host)
        if checked not in names:
            names.append(checked)
    return names


def _load_ca(paths: CertificatePaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not paths.ca_key.exists():
        raise ChemFLError(
            f"{paths.ca_cert} exists but its key {paths.ca_key} does not, so no server certificate "
            "can be signed: put the CA key back, or pass replace_ca=True and give the new ca.crt "
            "to every SuperNode and flwr connection."
        )
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"expected an EC key, got {type(ca_key).__name__}")
    except (ValueError, TypeError) as err:
        raise ChemFLError(
            f"cannot read the existing CA in {paths.ca_cert.parent} ({err}): fix or remove "
            "ca.crt/ca.key, or pass replace_ca=True (SuperNodes then need the new ca.crt)."
        ) from err
    if ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise ChemFLError(
            f"{paths.ca_key} is not the key of {paths.ca_cert}: restore the matching pair, or pass "
            "replace_ca=True (SuperNodes then need the new ca.crt)."
        )
    return ca_cert, ca_key


# --------------------------------------------------------------------------- SuperNode keys


def make_supernode_keys(out_dir: Path, names: list[str]) -> dict[str, KeyPair]:
    """One EC P-384 key per SuperNode: `<name>` (OpenSSH private, 0600) and `<name>.pub`.

    flower-supernode reads the private key with `load_ssh_private_key` and wants an EC key; the
    SuperLink accepts any NIST curve (`uses_nist_ec_curve`); P-384 is what Flower's docs use.
    An existing key is kept (a restarted SuperNode keeps its registered identity); a missing or
    stale `.pub` is rewritten from it.
    """
    if isinstance(names, str):
        raise ChemFLError(f"names must be a list of SuperNode names, got the string {names!r}: wrap it in [].")
    bad = [n for n in names if not _NAME.match(n) or n.endswith(".pub")]
    if bad:
        raise ChemFLError(
            f"SuperNode names {bad} cannot be key file names: use letters, digits, '.', '_', '-' "
            "(not starting with '.' or '-', not ending in '.pub'), e.g. 'polaris-0'."
        )
    if len(set(names)) != len(names):
        raise ChemFLError(f"SuperNode names repeat in {names}: give each SuperNode its own name.")
    out_dir = Path(out_dir)
    pairs: dict[str, KeyPair] = {}
    for name in names:
        pair = KeyPair(out_dir / name, out_dir / f"{name}.pub")
        if pair.private_key.exists():
            try:
                key = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)
            except (ValueError, TypeError) as err:
                raise ChemFLError(
                    f"{pair.private_key} exists but is not an unencrypted OpenSSH private key "
                    f"({err}): move it away to give SuperNode {name!r} a new identity (and register "
                    "the new .pub), or restore the original."
                ) from err
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ChemFLError(
                    f"{pair.private_key} is not an EC key, which flower-supernode requires: move it "
                    f"away to give SuperNode {name!r} a new EC identity (and register the new .pub)."
                )
        else:
            key = ec.generate_private_key(ec.SECP384R1())
            write_file_atomically(
                pair.private_key,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        line = public + f" chemfl-{name}\n".encode()
        existing = pair.public_key.read_bytes() if pair.public_key.exists() else b""
        if existing.split()[:2] != line.split()[:2]:
            write_file_atomically(pair.public_key, line, 0o644)
        pairs[name] = pair
    return pairs


# --------------------------------------------------------------------------- SuperLink command


def superlink_command(
    *,
    certificates: CertificatePaths | None,
    database: Path,
    host: str = "0.0.0.0",
    port: int = SUPERLINK_DEFAULT_PORT,
    insecure: bool = False,
    enable_supernode_auth: bool | None = None,
    log_file: Path | None = None,
    executable: str = "flower-superlink",
) -> list[str]:
    """The `flower-superlink` argv for a persistent, TLS, SuperNode-authenticating SuperLink.

    In flwr 1.41 one port serves the Fleet API (SuperNodes), the Control API (`flwr run`,
    `flwr supernode register`) and the Runtime API; `port` defaults to Flower's 8000. Port 443 may
    be wanted when SuperNodes sit behind a facility's outbound proxy (ALCF, OLCF) that may let only
    HTTPS on 443 through; binding below 1024 needs root or CAP_NET_BIND_SERVICE (or a port
    forward 443 -> 8000 on the SuperLink host).

    `database` keeps runs, registered SuperNodes and node ids across a SuperLink restart.
    Runtime dependency installation (`uv sync` of the app's dependencies) is switched off: the
    environments are complete and compute nodes are offline.
    `enable_supernode_auth` defaults to on with TLS and off with `insecure` (flwr refuses both);
    `insecure` is only allowed on localhost.
    """
    host = host.strip()
    if insecure:
        if not _is_local(host):
            raise ChemFLError(
                f"--insecure (no TLS) on host {host!r} would expose an unencrypted, "
                "unauthenticated SuperLink: use insecure only with host 127.0.0.1/localhost, or "
                "give certificates from make_certificates()."
            )
        if enable_supernode_auth:
            raise ChemFLError(
                "SuperNode authentication needs TLS (flower-superlink refuses "
                "--enable-supernode-auth with --insecure): drop insecure and give certificates."
            )
    elif certificates is None:
        raise ChemFLError(
            "a SuperLink without --insecure needs TLS certificates: pass "
            "certificates=make_certificates(out_dir, hosts), or insecure=True on localhost."
        )
    if host != "0.0.0.0" and host != "::":
        _check_host(host)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ChemFLError(f"SuperLink port {port!r} is not a TCP port: give 1-65535 (default 8000).")
    command = [executable, "--host", host, "--port", str(port)]
    if insecure:
        command.append("--insecure")
    else:
        assert certificates is not None
        command += [
            "--ssl-ca-certfile",
            str(certificates.ca_cert),
            "--ssl-certfile",
            str(certificates.server_cert),
            "--ssl-keyfile",
            str(certificates.server_key),
        ]
        if enable_supernode_auth is None or enable_supernode_auth:
            command.append("--enable-supernode-auth")
    command += ["--database", str(database), "--disable-runtime-dependency-installation"]
    if log_file is not None:
        command += ["--log-file", str(log_file)]
    return command


def superlink_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for flower-superlink: `base` (default os.environ), installs off, no local proxy.

    flwr 1.41 talks HTTPS through httpx, which honours https_proxy/no_proxy: the SuperLink's own
    SuperExec reaches the Runtime API on 127.0.0.1, which must never go to a facility proxy.
    """
    env = _no_local_proxy(base)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def _no_local_proxy(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for var in ("no_proxy", "NO_PROXY"):
        have = [p for p in env.get(var, "").split(",") if p]
        env[var] = ",".join(have + [h for h in ("localhost", "127.0.0.1", "::1") if h not in have])
    return env


# --------------------------------------------------------------------------- registration


def register_commands(public_keys: Iterable[Path], connection_name: str, *, flwr: str = "flwr") -> list[list[str]]:
    """`flwr supernode register <key.pub> <connection> --name <name>` per public key.

    The name shown by `flwr supernode list` is the file name without `.pub`.
    """
    _check_connection_name(connection_name)
    commands = []
    for key in public_keys:
        key = Path(key)
        name = key.name.removesuffix(".pub")
        commands.append([flwr, "supernode", "register", str(key), connection_name, "--name", name])
    return commands


def register_supernodes(
    public_keys: Iterable[Path],
    connection_name: str,
    *,
    flwr_home: Path | None = None,
    flwr: str = "flwr",
    timeout: float = 60,
) -> RegisterReport:
    """Run register_commands one by one; a key the SuperLink already knows counts as done.

    `flwr_home` is the FLWR_HOME holding the connection (write_connection); None: the caller's.
    """
    env = _no_local_proxy()
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    report = RegisterReport()
    for command in register_commands(public_keys, connection_name, flwr=flwr):
        name = command[command.index("--name") + 1]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            report.failed[name] = f"{' '.join(command)}: {err}"
            continue
        output = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            report.registered.append(name)
        elif _ALREADY_REGISTERED in output.lower():
            report.already_registered.append(name)
        else:
            report.failed[name] = output or f"exit status {done.returncode}"
    return report


# --------------------------------------------------------------------------- flwr connection


def _check_connection_name(name: str) -> None:
    if not isinstance(name, str) or not _CONNECTION_NAME.match(name) or name == "default":
        raise ChemFLError(
            f"connection name {name!r} cannot be a [superlink.<name>] key: use letters, digits, "
            "'_' and '-' (and not 'default'), e.g. 'chemfl-alcf'."
        )


def write_connection(
    flwr_home: Path,
    name: str,
    control_address: str,
    root_certificates: Path | None,
    insecure: bool,
    *,
    make_default: bool = False,
) -> Path:
    """Add or replace `[superlink.<name>]` in `$FLWR_HOME/config.toml`; keep everything else.

    Then `FLWR_HOME=<flwr_home> flwr run . <name>` reaches the SuperLink. A missing file starts
    from flwr's own default (which keeps the `local` simulation connection). Returns the file.
    """
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    _check_connection_name(name)
    host, _ = parse_address(control_address)
    entry: dict[str, object] = {"address": control_address}
    if insecure:
        if root_certificates is not None:
            raise ChemFLError(
                "a connection cannot be insecure and carry root-certificates (flwr refuses it): drop one of them."
            )
        if not _is_local(host):
            raise ChemFLError(
                f"insecure connection to {control_address} would send runs unencrypted: use "
                "insecure only for 127.0.0.1/localhost, or give root_certificates (the CA's ca.crt)."
            )
        entry["insecure"] = True
    elif root_certificates is not None:
        ca = Path(root_certificates).expanduser().resolve()
        if not ca.is_file():
            raise ChemFLError(f"root certificates {ca} do not exist: give the ca.crt written by make_certificates().")
        entry["root-certificates"] = str(ca)  # flwr requires an absolute path
    path = Path(flwr_home) / FLOWER_CONFIG_FILE
    if path.exists():
        try:
            config = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ChemFLError(
                f"{path} is not valid TOML ({err}): fix or move it away, then write the connection again."
            ) from err
        mode = path.stat().st_mode & 0o777
    else:
        config = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
        mode = 0o600
    superlink = config.setdefault("superlink", {})
    if not isinstance(superlink, dict):
        raise ChemFLError(f"{path}: 'superlink' is not a table: fix or move the file away.")
    superlink[name] = entry
    if make_default:
        superlink["default"] = name
    write_file_atomically(path, tomli_w.dumps(config).encode("utf-8"), mode)
    return path


# --------------------------------------------------------------------------- reachability

_GATEWAY_ERRORS = (502, 503, 504)  # nginx: the SuperLink behind it is down, starting, or too slow


def _check_behind_proxy(tls: ssl.SSLSocket, address: str, host: str) -> None:
    """`GET /health` on the verified connection: the SuperLink answers 200; a fleet-only proxy whose
    SuperLink is down answers 502. Only a gateway error fails: anything else (no answer, another
    status, a listener that closes after the handshake) leaves the TLS check as the verdict."""
    name = f"[{host}]" if ":" in host else host
    try:
        tls.sendall(f"GET /health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode("ascii"))
        status_line = tls.recv(256).split(b"\r\n", 1)[0].decode("ascii", "replace")
    except (OSError, ssl.SSLError):
        return
    parts = status_line.split()
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isdigit() and int(parts[1]) in _GATEWAY_ERRORS:
        raise ChemFLError(
            f"{address} answers TLS with the right certificate but the SuperLink behind it does not (HTTP "
            f"{parts[1]} for /health): the proxy (proxy.sh) runs, the SuperLink (superlink.sh) does not, or not "
            "on the internal port proxy.conf forwards to; start superlink.sh on the SuperLink host"
        )


def check_superlink(address: str, root_certificates: Path | None, insecure: bool, timeout: float = 5) -> None:
    """Raise ChemFLError unless `address` accepts TCP and (unless insecure) a TLS handshake
    whose certificate `root_certificates` verifies for that host name, and, when it answers
    `GET /health` with a gateway error, unless the SuperLink behind it is up (a fleet-only proxy
    answers TLS on its own: chemfl.launcher.proxy).

    `root_certificates` None with TLS: the system trust store (a SuperLink with a public cert).
    """
    host, port = parse_address(address)
    if insecure:
        if root_certificates is not None:
            raise ChemFLError(f"check of {address}: insecure and root_certificates exclude each other: drop one.")
        if not _is_local(host):
            raise ChemFLError(
                f"insecure (plain TCP, no TLS) is only for a SuperLink on 127.0.0.1/localhost, not "
                f"{address}: start the SuperLink with TLS certificates and give root_certificates."
            )
    ca_note = f"the CA in {root_certificates}" if root_certificates else "the system trust store"
    context: ssl.SSLContext | None = None
    if not insecure:
        if root_certificates is not None and not Path(root_certificates).is_file():
            raise ChemFLError(
                f"root certificates {root_certificates} do not exist: give the ca.crt written by "
                "make_certificates() (copied from the SuperLink host)."
            )
        try:
            context = ssl.create_default_context(cafile=str(root_certificates) if root_certificates else None)
        except ssl.SSLError as err:
            raise ChemFLError(
                f"{root_certificates} is not a PEM CA certificate ({err}): give the ca.crt from make_certificates()."
            ) from err
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        raise ChemFLError(
            f"SuperLink host {host!r} (from {address}) does not resolve ({err.strerror}): check the "
            "name, or use its IP address."
        ) from err
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ChemFLError(
            f"SuperLink at {address} is not reachable ({why}): check that flower-superlink is "
            f"running there with --port {port}, and that the port is open to this machine "
            "(firewall, facility proxy: https_proxy/no_proxy)."
        ) from err
    with sock:
        if context is None:
            return
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                _check_behind_proxy(tls, address, host)
                return
        except ssl.SSLCertVerificationError as err:
            if err.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
                raise ChemFLError(
                    f"the certificate of the SuperLink at {address} does not name {host!r}: "
                    f"regenerate it with make_certificates(out_dir, hosts=[..., {host!r}]) and "
                    "restart the SuperLink."
                ) from err
            raise ChemFLError(
                f"the SuperLink at {address} presents a certificate not trusted by {ca_note} "
                f"({err.verify_message}): give the ca.crt that signed the SuperLink's server "
                "certificate (the same make_certificates() output directory)."
            ) from err
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as err:
            raise ChemFLError(
                f"TLS handshake with {address} failed ({err}): something listens there but does "
                "not speak TLS; is flower-superlink started with --ssl-certfile/--ssl-keyfile "
                "(not --insecure) on that port?"
            ) from err
