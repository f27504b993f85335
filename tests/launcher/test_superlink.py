"""chemfl.launcher.superlink: certificates, SuperNode keys, commands, the flwr connection, checks.

Everything is checked against flwr 1.41's own parsers and loaders where one exists. The last test
starts a real flower-superlink on a free 127.0.0.1 port (a few seconds).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from chemfl.errors import ChemFLError
from chemfl.launcher.superlink import (
    CertificatePaths,
    check_superlink,
    make_certificates,
    make_supernode_keys,
    parse_address,
    register_commands,
    register_supernodes,
    superlink_command,
    write_connection,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificatePaths:
    return make_certificates(tmp_path_factory.mktemp("certs"), ["superlink.example.org", "10.1.2.3"])


# --------------------------------------------------------------------------- certificates


def test_server_certificate_chains_to_the_ca_and_names_every_host(certs: CertificatePaths):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert _mode(certs.ca_key) == 0o600 and _mode(certs.server_key) == 0o600
    assert sorted(p.name for p in certs.ca_cert.parent.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
    ]  # no temp files left behind
    # Python's own TLS stack accepts the pair (what uvicorn loads in flower-superlink).
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certs.server_cert, certs.server_key)


def test_existing_ca_is_kept_and_signs_the_new_server_certificate(tmp_path: Path):
    first = make_certificates(tmp_path, ["a.example.org"])
    ca_bytes, ca_key_bytes = first.ca_cert.read_bytes(), first.ca_key.read_bytes()
    second = make_certificates(tmp_path, ["b.example.org"])
    assert second.ca_cert.read_bytes() == ca_bytes and second.ca_key.read_bytes() == ca_key_bytes
    ca = x509.load_pem_x509_certificate(ca_bytes)
    server = x509.load_pem_x509_certificate(second.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "b.example.org" in sans.get_values_for_type(x509.DNSName)

    replaced = make_certificates(tmp_path, ["b.example.org"], replace_ca=True)
    assert replaced.ca_cert.read_bytes() != ca_bytes


def test_ca_without_its_key_is_refused_not_overwritten(tmp_path: Path):
    paths = make_certificates(tmp_path, [])
    paths.ca_key.unlink()
    ca_bytes = paths.ca_cert.read_bytes()
    with pytest.raises(ChemFLError, match="replace_ca=True"):
        make_certificates(tmp_path, [])
    assert paths.ca_cert.read_bytes() == ca_bytes


@pytest.mark.parametrize("host", ["superlink.example.org:8000", "https://x.org", "bad host", ""])
def test_hosts_must_be_bare_names_or_addresses(tmp_path: Path, host: str):
    with pytest.raises(ChemFLError, match="neither a DNS name nor an IP address"):
        make_certificates(tmp_path, [host])
    assert not (tmp_path / "ca.crt").exists()


# --------------------------------------------------------------------------- SuperNode keys


def test_supernode_keys_load_with_flwrs_loaders_and_survive_a_rerun(tmp_path: Path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    keys = make_supernode_keys(tmp_path, ["polaris-0", "aurora-0"])
    assert set(keys) == {"polaris-0", "aurora-0"}
    for pair in keys.values():
        assert pair.private_key.name in {"polaris-0", "aurora-0"}
        assert pair.public_key == pair.private_key.with_name(pair.private_key.name + ".pub")
        assert _mode(pair.private_key) == 0o600
        args = argparse.Namespace(auth_supernode_private_key=str(pair.private_key), auth_supernode_public_key=None)
        private, public = _try_setup_client_authentication(args)  # what flower-supernode runs
        assert isinstance(private.curve, ec.SECP384R1)
        # flwr supernode register sends this PEM; it must be the private key's public half.
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        assert try_load_public_key(pair.public_key) == public_key_to_bytes(public)

    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    keys["polaris-0"].public_key.unlink()
    again = make_supernode_keys(tmp_path, ["polaris-0", "aurora-0", "frontier-0"])
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: after[k] for k in before} == before  # same identities, .pub rewritten identically
    assert again["frontier-0"].private_key.exists()


def test_a_broken_existing_key_is_refused_not_replaced(tmp_path: Path):
    (tmp_path / "node").write_text("not a key")
    with pytest.raises(ChemFLError, match="move it away"):
        make_supernode_keys(tmp_path, ["node"])
    assert (tmp_path / "node").read_text() == "not a key"


@pytest.mark.parametrize("names", [["../x"], [".hidden"], ["a", "a"], ["x.pub"], "node"])
def test_supernode_names_are_checked(tmp_path: Path, names):
    with pytest.raises(ChemFLError):
        make_supernode_keys(tmp_path, names)


# --------------------------------------------------------------------------- commands


def test_superlink_command_parses_with_flwrs_own_parser(certs: CertificatePaths, tmp_path: Path):
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    command = superlink_command(certificates=certs, database=tmp_path / "state.db", port=443)
    assert command[0] == "flower-superlink"
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in command
    assert "--insecure" not in command
    args = _parse_args_run_superlink().parse_args(command[1:])
    assert (args.host, args.port) == ("0.0.0.0", 443)
    assert args.ssl_certfile == str(certs.server_cert) and args.ssl_keyfile == str(certs.server_key)
    assert args.ssl_ca_certfile == str(certs.ca_cert)
    assert args.enable_supernode_auth and not args.insecure
    assert args.database == str(tmp_path / "state.db")
    assert args.runtime_dependency_install is False


def test_superlink_default_port_is_flowers(certs: CertificatePaths, tmp_path: Path):
    from flwr.supercore.constant import SUPERLINK_UVICORN_DEFAULT_PORT

    command = superlink_command(certificates=certs, database=tmp_path / "db")
    assert command[command.index("--port") + 1] == str(SUPERLINK_UVICORN_DEFAULT_PORT)


def test_insecure_only_on_localhost(certs: CertificatePaths, tmp_path: Path):
    db = tmp_path / "db"
    with pytest.raises(ChemFLError, match="only with host 127.0.0.1/localhost"):
        superlink_command(certificates=certs, database=db, insecure=True)
    with pytest.raises(ChemFLError, match="only with host"):
        superlink_command(certificates=None, database=db, host="10.0.0.5", insecure=True)
    local = superlink_command(certificates=None, database=db, host="127.0.0.1", insecure=True)
    assert "--insecure" in local and "--enable-supernode-auth" not in local
    assert not any(flag.startswith("--ssl") for flag in local)
    with pytest.raises(ChemFLError, match="needs TLS"):
        superlink_command(certificates=None, database=db, host="127.0.0.1", insecure=True, enable_supernode_auth=True)
    with pytest.raises(ChemFLError, match="needs TLS certificates"):
        superlink_command(certificates=None, database=db)
    with pytest.raises(ChemFLError, match="not a TCP port"):
        superlink_command(certificates=certs, database=db, port=70000)


def test_register_commands_match_flwr_supernode_register(tmp_path: Path):
    import typer
    from flwr.cli.app import app

    commands = register_commands([tmp_path / "polaris-0.pub", tmp_path / "aurora-0.pub"], "chemfl")
    assert commands[0] == [
        "flwr",
        "supernode",
        "register",
        str(tmp_path / "polaris-0.pub"),
        "chemfl",
        "--name",
        "polaris-0",
    ]
    register = typer.main.get_command(app).commands["supernode"].commands["register"]
    params = register.make_context("register", commands[1][3:]).params
    assert (str(params["public_key"]), params["superlink"], params["name"]) == (
        str(tmp_path / "aurora-0.pub"),
        "chemfl",
        "aurora-0",
    )
    with pytest.raises(ChemFLError, match="connection name"):
        register_commands([tmp_path / "a.pub"], "bad name")


def test_register_supernodes_reports_each_outcome(tmp_path: Path):
    """A stand-in `flwr` (the real one is exercised against a real SuperLink below)."""
    fake = tmp_path / "flwr"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "key = sys.argv[3].rsplit('/', 1)[1]\n"
        "assert os.environ['FLWR_HOME'] == sys.argv[0].rsplit('/', 1)[0] + '/home'\n"
        "if 'old' in key: print('[code: 23] Public key already in use.'); sys.exit(1)\n"
        "if 'bad' in key: print('Public key file does not exist.', file=sys.stderr); sys.exit(1)\n"
        "print('registered')\n"
    )
    fake.chmod(0o755)
    keys = [tmp_path / f"{n}.pub" for n in ("new", "old", "bad")]
    report = register_supernodes(keys, "chemfl", flwr_home=tmp_path / "home", flwr=str(fake))
    assert report.registered == ["new"] and report.already_registered == ["old"]
    assert list(report.failed) == ["bad"] and "does not exist" in report.failed["bad"]
    assert not report.ok
    missing = register_supernodes(keys[:1], "chemfl", flwr=str(tmp_path / "no-such-flwr"))
    assert list(missing.failed) == ["new"]


# --------------------------------------------------------------------------- connection


def test_write_connection_keeps_other_entries_and_flwr_reads_it(
    tmp_path: Path, certs: CertificatePaths, monkeypatch: pytest.MonkeyPatch
):
    from flwr.cli.config_utils import load_certificate_in_connection
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "mine"\n\n[superlink.mine]\naddress = "other.org:9093"\n'
        'insecure = false\n\n[superlink.local]\naddress = ":local:"\n'
        "[superlink.local.options]\nnum-supernodes = 4\n"
    )
    write_connection(home, "chemfl", "superlink.example.org:443", certs.ca_cert, False)
    write_connection(home, "chemfl", "superlink.example.org:8000", certs.ca_cert, False)  # replace
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("chemfl")
    assert conn.address == "superlink.example.org:8000" and not conn.insecure
    assert conn.root_certificates == str(certs.ca_cert.resolve())
    assert load_certificate_in_connection(conn) == certs.ca_cert.read_bytes()
    mine = read_superlink_connection(None)  # the default is untouched
    assert (mine.name, mine.address) == ("mine", "other.org:9093")
    assert read_superlink_connection("local").options.num_supernodes == 4
    assert [p.name for p in home.iterdir()] == ["config.toml"]


def test_write_connection_starts_from_flwrs_default_and_makes_ca_paths_absolute(
    tmp_path: Path, certs: CertificatePaths, monkeypatch: pytest.MonkeyPatch
):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "new-home"
    monkeypatch.chdir(certs.ca_cert.parent)
    path = write_connection(home, "chemfl", "127.0.0.1:8000", Path("ca.crt"), False, make_default=True)
    assert _mode(path) == 0o600
    monkeypatch.setenv("FLWR_HOME", str(home))
    assert read_superlink_connection(None).root_certificates == str(certs.ca_cert.resolve())
    assert read_superlink_connection("local").address == ":local:"
    write_connection(home, "dev", "localhost:8000", None, True)
    assert read_superlink_connection("dev").insecure


def test_write_connection_refuses_bad_input_and_leaves_the_file(tmp_path: Path, certs):
    home = tmp_path
    (home / "config.toml").write_text("this is [not toml")
    with pytest.raises(ChemFLError, match="not valid TOML"):
        write_connection(home, "chemfl", "127.0.0.1:8000", certs.ca_cert, False)
    assert (home / "config.toml").read_text() == "this is [not toml"
    with pytest.raises(ChemFLError, match="insecure only for 127.0.0.1/localhost"):
        write_connection(home, "chemfl", "superlink.example.org:8000", None, True)
    with pytest.raises(ChemFLError, match="not host:port"):
        write_connection(home, "chemfl", "https://superlink.example.org:8000", certs.ca_cert, False)
    with pytest.raises(ChemFLError, match="do not exist"):
        write_connection(home, "chemfl", "127.0.0.1:8000", tmp_path / "missing.crt", False)
    with pytest.raises(ChemFLError, match="connection name"):
        write_connection(home, "default", "127.0.0.1:8000", certs.ca_cert, False)


# --------------------------------------------------------------------------- check_superlink


class _Listener:
    """A 127.0.0.1 listener in a thread: TLS with `certs`, or plain TCP that answers like HTTP."""

    def __init__(self, certs: CertificatePaths | None, host: str = "127.0.0.1", answer: bytes = b"") -> None:
        self.answer = answer  # TLS: what to send back to the first request after the handshake (b"": close)
        self.context = None
        if certs is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(certs.server_cert, certs.server_key)
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    if self.context is None:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    else:
                        with self.context.wrap_socket(conn, server_side=True) as tls:
                            if self.answer:
                                tls.recv(1024)
                                tls.sendall(self.answer)
                except (OSError, ssl.SSLError):
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def tls_server(certs: CertificatePaths) -> Iterator[_Listener]:
    server = _Listener(certs)
    yield server
    server.close()


def test_check_superlink_passes_for_a_tls_server_the_ca_trusts(tls_server, certs):
    check_superlink(tls_server.address, certs.ca_cert, insecure=False)
    port = tls_server.address.rsplit(":", 1)[1]
    check_superlink(f"localhost:{port}", certs.ca_cert, insecure=False)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_check_superlink_sees_a_proxy_without_its_superlink(certs, status: int):
    """A fleet-only proxy answers TLS on its own; GET /health then says whether the SuperLink is behind it."""
    down = _Listener(certs, answer=f"HTTP/1.1 {status} Bad Gateway\r\nContent-Length: 0\r\n\r\n".encode())
    up = _Listener(certs, answer=b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    other = _Listener(certs, answer=b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    try:
        with pytest.raises(ChemFLError, match=f"SuperLink behind it does not \\(HTTP {status} for /health\\)"):
            check_superlink(down.address, certs.ca_cert, insecure=False, timeout=2)
        check_superlink(up.address, certs.ca_cert, insecure=False, timeout=2)
        check_superlink(other.address, certs.ca_cert, insecure=False, timeout=2)  # not a gateway error
    finally:
        for listener in (down, up, other):
            listener.close()


def test_check_superlink_nothing_listening():
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(ChemFLError, match=f"SuperLink at {address} is not reachable.*running"):
        check_superlink(address, None, insecure=True, timeout=1)


def test_check_superlink_plain_tcp_listener_is_not_tls(certs: CertificatePaths):
    plain = _Listener(None)
    try:
        with pytest.raises(ChemFLError, match="TLS handshake with .* failed.*--ssl-certfile"):
            check_superlink(plain.address, certs.ca_cert, insecure=False, timeout=2)
        check_superlink(plain.address, None, insecure=True)  # insecure localhost: TCP is enough
    finally:
        plain.close()


def test_check_superlink_certificate_from_another_ca(tls_server, tmp_path: Path):
    other = make_certificates(tmp_path, [])
    with pytest.raises(ChemFLError, match=f"not trusted by the CA in {other.ca_cert}"):
        check_superlink(tls_server.address, other.ca_cert, insecure=False)


def test_check_superlink_certificate_for_another_host(tmp_path: Path):
    certs = make_certificates(tmp_path, [])  # localhost and 127.0.0.1 only
    try:
        server = _Listener(certs, host="127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here")
    try:
        with pytest.raises(ChemFLError, match="does not name '127.0.0.2'"):
            check_superlink(server.address, certs.ca_cert, insecure=False)
    finally:
        server.close()


@pytest.mark.parametrize(
    ("address", "insecure", "message"),
    [
        ("superlink.example.org", False, "not host:port"),
        ("https://superlink.example.org:443", False, "not host:port"),
        ("superlink.example.org:99999", False, "not host:port"),
        ("superlink.example.org:8000", True, "only for a SuperLink on 127.0.0.1/localhost"),
        ("no-such-host.invalid:8000", False, "does not resolve"),
    ],
)
def test_check_superlink_input_errors(address: str, insecure: bool, message: str):
    with pytest.raises(ChemFLError, match=message):
        check_superlink(address, None, insecure=insecure, timeout=1)


def test_check_superlink_missing_ca_file(tmp_path: Path):
    with pytest.raises(ChemFLError, match="do not exist"):
        check_superlink("127.0.0.1:8000", tmp_path / "ca.crt", insecure=False)


def test_parse_address_ipv6():
    assert parse_address("[::1]:8000") == ("::1", 8000)
    with pytest.raises(ChemFLError, match="brackets"):
        parse_address("::1:8000")


# --------------------------------------------------------------------------- real SuperLink


def _flwr_binary(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


@pytest.mark.skipif(_flwr_binary("flower-superlink") is None, reason="flower-superlink not installed")
def test_REAL_flower_superlink_starts_with_tls_and_auth_and_registers_keys(tmp_path: Path):
    """REAL: flower-superlink with generated certs, --enable-supernode-auth and a database on a free
    127.0.0.1 port; check_superlink passes, `flwr supernode register` succeeds, then is idempotent."""
    certs = make_certificates(tmp_path / "certs", [])
    keys = make_supernode_keys(tmp_path / "keys", ["node-0"])
    port = _free_port()
    command = superlink_command(
        certificates=certs,
        database=tmp_path / "state.db",
        host="127.0.0.1",
        port=port,
        executable=_flwr_binary("flower-superlink"),
    )
    bin_dir = str(Path(_flwr_binary("flower-superlink")).parent)
    env = dict(
        os.environ, FLWR_HOME=str(tmp_path / "superlink-home"), PATH=bin_dir + os.pathsep + os.environ.get("PATH", "")
    )
    log = (tmp_path / "superlink.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                check_superlink(f"127.0.0.1:{port}", certs.ca_cert, insecure=False, timeout=1)
                break
            except ChemFLError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("flower-superlink did not start:\n" + (tmp_path / "superlink.log").read_text())
                time.sleep(0.2)
        home = tmp_path / "cli-home"
        write_connection(home, "chemfl-test", f"127.0.0.1:{port}", certs.ca_cert, False)
        flwr = _flwr_binary("flwr")
        first = register_supernodes([keys["node-0"].public_key], "chemfl-test", flwr_home=home, flwr=flwr)
        assert first.registered == ["node-0"], first
        again = register_supernodes([keys["node-0"].public_key], "chemfl-test", flwr_home=home, flwr=flwr)
        assert again.already_registered == ["node-0"], again
        assert (tmp_path / "state.db").exists()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        log.close()
