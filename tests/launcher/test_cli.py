"""`chemfl launch superlink|register|submit|status|stop`, with the fake PBS/Slurm commands and a
TLS listener standing in for the SuperLink (the real one: tests/launcher/test_deployment.py)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from chemfl.cli import main
from chemfl.hpc.launch_log import read_events
from chemfl.launcher.facilities import load_facilities
from chemfl.launcher.render import render_body, render_script
from chemfl.launcher.superlink import CertificatePaths, make_certificates
from chemfl.launcher.watch import read_state
from chemfl.simulation import free_port
from tests.launcher.fakes import FakeSchedulers, install_fake_schedulers

REPO_ROOT = Path(__file__).resolve().parents[2]
GLOBUS_ENDPOINT = "2f5a8a3e-0000-4000-8000-000000000001"


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeSchedulers:
    return install_fake_schedulers(monkeypatch, tmp_path / "scheduler")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertificatePaths:
    return make_certificates(tmp_path_factory.mktemp("certs"), [])


class TlsListener:
    """Accepts TLS connections on 127.0.0.1 with the server certificate, like a SuperLink's port."""

    def __init__(self, certs: CertificatePaths) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certs.server_cert, certs.server_key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                connection.close()

    def close(self) -> None:
        self.running = False
        self.sock.close()


@pytest.fixture
def superlink(certs) -> Iterator[TlsListener]:
    listener = TlsListener(certs)
    yield listener
    listener.close()


def facilities_file(
    tmp_path: Path,
    address: str,
    ca: Path | str,
    *,
    extra: dict | None = None,
    superlink: dict | None = None,
    **facilities: dict,
) -> Path:
    """A facilities file: [superlink] at `address`, and `facilities` (default: polaris with two SuperNodes
    per GPU layout, perlmutter with one SuperNode and a trainer, per-job layout, its recipe beside the file)."""
    (tmp_path / "recipe.toml").write_text('run-name = "cli"\n')
    tables = facilities or {
        "polaris": {
            "profile": "polaris",
            "account": "proj",
            "walltime": "00:30:00",
            "layout": "per-gpu",
            "supernodes-per-node": 2,
            "data-path": "/eagle/proj/partitions/polaris",
            "resubmit-backoff": 0,
            "max-resubmits": 2,
        },
        "perlmutter": {
            "profile": "perlmutter",
            "account": "proj",
            "walltime": "00:20:00",
            "recipe": "recipe.toml",
            "data-path": "$PSCRATCH/partitions/perlmutter",
            "resubmit-backoff": 0,
        },
    }
    for name, table in (extra or {}).items():
        tables[name] = table
    plan = {
        "superlink": {
            "address": address,
            "root-certificates": str(ca),
            "keys-dir": "~/chemfl/keys",
            **(superlink or {}),
        },
        "facilities": tables,
    }
    path = tmp_path / "facilities.toml"
    path.write_text(tomli_w.dumps(plan))
    return path


def run_cli(*argv: str | Path) -> int:
    return main(["launch", *map(str, argv)])


def listing(folder: Path) -> dict[str, int]:
    """Every file under `folder` and its modification time (ns): to prove nothing was written."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


# --- submit --dry-run ------------------------------------------------------------------------------


def test_dry_run_writes_every_script_and_submits_nothing(tmp_path, fake, certs, capsys):
    path = facilities_file(
        tmp_path,
        "127.0.0.1:9",
        certs.ca_cert,  # nothing listens there: a dry run does not look
        extra={
            "aurora": {
                "profile": "aurora",
                "account": "proj",
                "walltime": "00:30:00",
                "layout": "per-gpu",
                "supernodes-per-node": 2,
                "data-path": "/flare/partitions/aurora",
                "backend": "globus",
                "globus-endpoint": GLOBUS_ENDPOINT,
            }
        },
    )
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--dry-run", "--out", out) == 0

    plan = load_facilities(path)
    for facility in plan.facilities:
        assert (out / f"{facility.name}.sh").read_text() == render_script(plan, facility)
        assert os.access(out / f"{facility.name}.sh", os.X_OK)
    assert (out / "aurora.body.sh").read_text() == render_body(plan, plan.facilities[2])
    assert sorted(p.name for p in out.iterdir()) == ["aurora.body.sh", "aurora.sh", "perlmutter.sh", "polaris.sh"]
    assert fake.calls() == []  # no qsub, no sbatch, not even a qstat
    printed = capsys.readouterr().out
    assert "SuperLink not checked (--dry-run)" in printed
    assert "qsub polaris.sh" in printed and "sbatch perlmutter.sh" in printed
    assert GLOBUS_ENDPOINT in printed and "aurora.body.sh" in printed


def test_only_renders_the_named_facilities_with_the_whole_plans_ports(tmp_path, certs):
    local = {
        name: {"profile": "local", "walltime": "00:10:00", "data-path": str(tmp_path), "recipe": "recipe.toml"}
        for name in ("a", "b")
    }
    path = facilities_file(tmp_path, "127.0.0.1:9", certs.ca_cert, **local)
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--dry-run", "--out", out, "--only", "b") == 0
    assert [p.name for p in out.iterdir()] == ["b.sh"]
    assert "--port $(( 9095 + gpu ))" in (out / "b.sh").read_text()  # after a's 9094, as in a full launch


# --- bad input: an error before anything is written or submitted ----------------------------------


SUBMIT_ERRORS = {
    "no such file": (lambda tmp, cert, port: ["submit", tmp / "missing.toml"], "no such facilities file"),
    "bad facility": (
        lambda tmp, cert, port: [
            "submit",
            facilities_file(
                tmp,
                f"127.0.0.1:{port}",
                cert,
                polaris={
                    "profile": "polaris",
                    "account": "proj",
                    "walltime": "00:30:00",
                    "data-path": "/x",
                    "wall-time": "1",
                },
            ),
        ],
        'unknown key "wall-time"',
    ),
    "unknown --only": (
        lambda tmp, cert, port: ["submit", facilities_file(tmp, f"127.0.0.1:{port}", cert), "--only", "summit"],
        "--only summit: no such facility",
    ),
    "dry run and watch": (
        lambda tmp, cert, port: ["submit", facilities_file(tmp, f"127.0.0.1:{port}", cert), "--dry-run", "--watch"],
        "nothing to --watch",
    ),
    "poll": (
        lambda tmp, cert, port: ["submit", facilities_file(tmp, f"127.0.0.1:{port}", cert), "--poll", "0"],
        "--poll 0",
    ),
    "no SuperLink": (
        lambda tmp, cert, port: ["submit", facilities_file(tmp, f"127.0.0.1:{free_port()}", cert)],
        "is not reachable",
    ),
    "CA not here": (
        lambda tmp, cert, port: ["submit", facilities_file(tmp, f"127.0.0.1:{port}", tmp / "elsewhere" / "ca.crt")],
        "--root-certificates",
    ),
    "another CA": (
        lambda tmp, cert, port: [
            "submit",
            facilities_file(tmp, f"127.0.0.1:{port}", make_certificates(tmp / "other-ca", []).ca_cert),
        ],
        "not trusted by",
    ),
}


@pytest.mark.parametrize("case", SUBMIT_ERRORS)
def test_submit_errors_before_writing_or_submitting(case, tmp_path, fake, certs, superlink, capsys):
    arguments, message = SUBMIT_ERRORS[case]
    argv = arguments(tmp_path, certs.ca_cert, superlink.port)
    out = tmp_path / "launch"
    assert run_cli(*argv, "--out", out) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert fake.calls() == []


def test_submit_without_the_scheduler_command_errors_first(tmp_path, certs, superlink, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no qsub, no sbatch here
    out = tmp_path / "launch"
    assert run_cli("submit", facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert), "--out", out) == 2
    error = capsys.readouterr().err
    assert "`qsub` is not on PATH" in error and "--dry-run" in error
    assert not out.exists()


def test_a_local_job_without_flower_supernode_on_path_errors_first(tmp_path, certs, superlink, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # bash, but no flower-supernode
    path = facilities_file(
        tmp_path,
        f"127.0.0.1:{superlink.port}",
        certs.ca_cert,
        a={"profile": "local", "walltime": "00:10:00", "data-path": str(tmp_path), "layout": "per-gpu"},
    )
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--out", out) == 2
    assert "flower-supernode, which is not on PATH" in capsys.readouterr().err
    assert not out.exists()


def test_a_local_per_job_facility_needs_chemfl_and_torchrun_too(tmp_path, certs, superlink, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    local = {"profile": "local", "walltime": "00:10:00", "data-path": str(tmp_path), "recipe": "recipe.toml"}
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert, a=local)
    assert run_cli("submit", path, "--out", tmp_path / "launch") == 2
    assert "flower-supernode, chemfl, torchrun, which are not on PATH" in capsys.readouterr().err


AURORA = {
    "profile": "aurora",
    "account": "proj",
    "walltime": "00:30:00",
    "data-path": "/lus/flare/projects/proj/partitions/aurora",
    "recipe": "recipe.toml",
}


def test_aurora_jobs_are_not_submitted_from_home(tmp_path, fake, certs, superlink, monkeypatch, capsys):
    """ALCF's Aurora guide: submit from the project directory, not home. qsub runs in the launch folder."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the launch folder below is in this home
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert, aurora=dict(AURORA))
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--out", out) == 2
    error = capsys.readouterr().err
    assert "submit jobs from the project directory, not home" in error and "--out /lus/flare/projects/" in error
    assert not out.exists() and fake.calls() == []

    # A dry run (maybe not on Aurora) writes the scripts and warns.
    assert run_cli("submit", path, "--out", out, "--dry-run") == 0
    assert "warning: facility aurora: ALCF's Aurora guide" in capsys.readouterr().out
    assert (out / "aurora.sh").is_file()


def test_aurora_jobs_are_submitted_from_outside_home(tmp_path, fake, certs, superlink, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert, aurora=dict(AURORA))
    out = tmp_path / "project" / "launch"
    assert run_cli("submit", path, "--out", out) == 0
    assert fake.calls() == [(str(out.resolve()), f"qsub {out.resolve()}/aurora.sh")]


def test_frontier_debug_jobs_are_never_resubmitted(tmp_path, fake, certs, superlink, capsys):
    frontier = {
        "profile": "frontier",
        "account": "proj",
        "queue": "debug",
        "walltime": "00:30:00",
        "setup": ["module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a"],
        "data-path": "/lustre/orion/proj/partitions/frontier",
        "recipe": "recipe.toml",
    }
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert, frontier=frontier)
    assert run_cli("submit", path, "--out", tmp_path / "launch") == 0
    assert "frontier: queue debug: OLCF's debug QOS forbids job chaining" in capsys.readouterr().out
    frontier["max-resubmits"] = 1
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert, frontier=frontier)
    assert run_cli("submit", path, "--out", tmp_path / "launch2") == 2
    assert "set max-resubmits = 0" in capsys.readouterr().err


def test_a_launch_folder_still_in_use_is_refused(tmp_path, fake, certs, superlink, capsys):
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert)
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--out", out) == 0
    before, calls = listing(out), fake.calls()
    for extra in ([], ["--dry-run"]):
        assert run_cli("submit", path, "--out", out, *extra) == 2
        assert "holds a launch that may still run" in capsys.readouterr().err
    assert listing(out) == before and fake.calls() == calls
    assert run_cli("stop", out) == 0
    assert run_cli("submit", path, "--out", out) == 0  # stopped: the folder is free again


# --- submit, status, stop --------------------------------------------------------------------------


def test_submit_status_stop_with_fake_schedulers(tmp_path, fake, certs, superlink, capsys):
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert)
    out = tmp_path / "launch"
    assert run_cli("submit", path, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"SuperLink 127.0.0.1:{superlink.port} reachable from here" in printed
    assert fake.calls() == [
        (str(out.resolve()), f"qsub {out.resolve()}/polaris.sh"),
        (str(out.resolve()), f"sbatch --parsable {out.resolve()}/perlmutter.sh"),
    ]
    events = read_events(out / "launch.jsonl")
    assert [(e["facility"], e["event"], e["job_id"]) for e in events] == [
        ("polaris", "submitted", "1001.fake-pbs-01"),
        ("perlmutter", "submitted", "1002"),
    ]
    assert read_state(out)["watcher_pid"] is None  # without --watch, nobody follows the jobs

    fake.set_state("1002", "RUNNING")
    assert run_cli("status", out) == 0
    table = capsys.readouterr().out
    assert "1001.fake-pbs-01" in table and "watcher: not running" in table
    assert "queued, now running" in table  # no watcher: the scheduler is asked (squeue)
    assert fake.commands()[-2:] == ["qstat -x -f 1001.fake-pbs-01", "squeue -h -j 1002 -o %T"]

    assert run_cli("stop", out) == 0
    assert "polaris: job 1001.fake-pbs-01 cancelled" in capsys.readouterr().out
    assert fake.commands()[-2:] == ["qdel 1001.fake-pbs-01", "scancel 1002"]
    assert fake.state("1001.fake-pbs-01") == "F" and fake.state("1002") == "CANCELLED"
    assert [e["event"] for e in read_events(out / "launch.jsonl")][-2:] == ["cancelled", "cancelled"]


def test_watch_resubmits_an_ended_job_until_stop(tmp_path, fake, certs, superlink):
    """The watcher in its own process (as a user runs it), jobs moved through their states by hand."""
    path = facilities_file(tmp_path, f"127.0.0.1:{superlink.port}", certs.ca_cert)
    out = tmp_path / "launch"
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chemfl.cli",
            "launch",
            "submit",
            str(path),
            "--out",
            str(out),
            "--watch",
            "--poll",
            "0.2",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    try:

        def wait_for(predicate, what: str, seconds: float = 30) -> None:
            deadline = time.monotonic() + seconds
            while not predicate():
                if watcher.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"{what}; watcher output:\n{watcher.stdout.read() if watcher.poll() is not None else ''}"
                    )
                time.sleep(0.1)

        def events() -> list[tuple[str, str, str]]:
            if not (out / "launch.jsonl").exists():
                return []
            return [(e["facility"], e["event"], e["job_id"]) for e in read_events(out / "launch.jsonl")]

        wait_for(lambda: ("perlmutter", "submitted", "1002") in events(), "no submission")
        fake.set_state("1001.fake-pbs-01", "R")
        wait_for(lambda: ("polaris", "started", "1001.fake-pbs-01") in events(), "no start seen")
        fake.set_state("1001.fake-pbs-01", "F")  # its walltime ran out
        wait_for(lambda: ("polaris", "resubmitted", "1003.fake-pbs-01") in events(), "no resubmission")
        assert ("polaris", "ended", "1001.fake-pbs-01") in events()

        assert run_cli("stop", out) == 0
        assert watcher.wait(timeout=30) == 0
        output = watcher.stdout.read()
        assert "polaris: resubmitted (job 1003.fake-pbs-01, attempt 1)" in output
        assert read_state(out)["watcher_pid"] is None
        assert "qdel 1003.fake-pbs-01" in fake.commands() and "scancel 1002" in fake.commands()
        assert fake.commands().count("qsub " + str(out.resolve() / "polaris.sh")) == 2
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_status_and_stop_need_a_launch_folder(tmp_path, capsys):
    for action in ("status", "stop"):
        assert run_cli(action, tmp_path / "nothing") == 2
        assert "holds no launch" in capsys.readouterr().err


# --- superlink and register ------------------------------------------------------------------------


def test_superlink_writes_certificates_keys_script_and_connection(tmp_path, certs, capsys):
    path = facilities_file(tmp_path, "fl.example.org:443", "~/chemfl/certs/ca.crt")
    out, home = tmp_path / "server", tmp_path / "flwr-home"
    assert run_cli("superlink", path, "--out", out, "--flwr-home", home, "--connection", "chemfl-test") == 0
    printed = capsys.readouterr().out

    names = ["polaris-0", "polaris-1", "perlmutter-0"]
    assert sorted(p.name for p in (out / "keys").iterdir()) == sorted(names + [f"{n}.pub" for n in names])
    assert all((out / "keys" / name).stat().st_mode & 0o777 == 0o600 for name in names)
    assert sorted(p.name for p in (out / "certs").iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]

    script = (out / "superlink.sh").read_text()
    assert subprocess.run(["bash", "-n", str(out / "superlink.sh")]).returncode == 0
    command = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " ").replace('"$here', f'"{out}'))
    # exposure fleet-only (the default): the SuperLink on 127.0.0.1:9093, nginx on the public port 8000
    assert command[:5] == ["flower-superlink", "--host", "127.0.0.1", "--port", "9093"]
    assert "ssh -N -L 9093:127.0.0.1:9093" in script
    assert subprocess.run(["bash", "-n", str(out / "proxy.sh")]).returncode == 0
    proxy_conf = (out / "proxy.conf").read_text()
    assert "listen 0.0.0.0:8000 ssl;" in proxy_conf and "server 127.0.0.1:9093;" in proxy_conf
    assert "ssl_certificate certs/server.crt;" in proxy_conf  # relative: the folder can move
    for flag, file in (
        ("--ssl-ca-certfile", "certs/ca.crt"),
        ("--ssl-certfile", "certs/server.crt"),
        ("--ssl-keyfile", "certs/server.key"),
        ("--database", "state.db"),
    ):
        assert command[command.index(flag) + 1] == str(out / file)
    assert "--enable-supernode-auth" in command and "--disable-runtime-dependency-installation" in command
    assert "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in script

    connection = tomllib.loads((home / "config.toml").read_text())["superlink"]["chemfl-test"]
    assert connection == {"address": "127.0.0.1:9093", "root-certificates": str(out / "certs" / "ca.crt")}
    assert "server/keys/polaris-0 .. polaris-1 -> ~/chemfl/keys/" in printed.replace(str(tmp_path) + "/", "")
    assert "certs/ca.crt -> ~/chemfl/certs/ca.crt" in printed
    assert "forward it to 8000" in printed  # SuperNodes were told 443
    assert "chemfl launch register" in printed
    assert "proxy.sh" in printed and "ssh -N -L 9093:127.0.0.1:9093 fl.example.org" in printed

    # A rerun keeps the CA and every key (SuperNodes keep their identity and their copies).
    kept = {p: p.read_bytes() for p in [out / "certs" / "ca.crt", *(out / "keys").iterdir()]}
    assert run_cli("superlink", path, "--out", out, "--flwr-home", home, "--connection", "chemfl-test") == 0
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_superlink_direct_exposure_only_when_asked(tmp_path, capsys):
    """exposure = "direct": the SuperLink itself on the public port (Control API included), refused on a
    non-local address or bind unless --expose-control-api; no proxy files; the connection on that port."""
    path = facilities_file(tmp_path, "fl.example.org:8000", "~/chemfl/certs/ca.crt", superlink={"exposure": "direct"})
    out, home = tmp_path / "server", tmp_path / "flwr-home"
    assert run_cli("superlink", path, "--out", out, "--flwr-home", home) == 2
    assert "--expose-control-api" in capsys.readouterr().err and not out.exists()
    assert run_cli("superlink", path, "--out", out, "--flwr-home", home, "--expose-control-api") == 0
    printed = capsys.readouterr().out
    assert "also serves the Control API" in printed and "proxy.sh" not in printed
    setup = json.loads((out / "superlink.json").read_text())
    assert setup["command"][1:5] == ["--host", "0.0.0.0", "--port", "8000"]
    assert (setup["exposure"], setup["internal_port"], setup["connection_address"]) == (
        "direct",
        None,
        "fl.example.org:8000",
    )
    assert not (out / "proxy.sh").exists() and not (out / "proxy.conf").exists()

    # A localhost study needs no override, and binds 127.0.0.1.
    local = facilities_file(tmp_path, "127.0.0.1:8000", out / "certs" / "ca.crt", superlink={"exposure": "direct"})
    assert run_cli("superlink", local, "--out", out, "--flwr-home", home) == 0
    assert json.loads((out / "superlink.json").read_text())["command"][1:3] == ["--host", "127.0.0.1"]


def test_a_set_up_written_before_the_proxy_loads_as_direct(tmp_path):
    from chemfl.launcher.commands.superlink import SuperLinkSetup

    path = facilities_file(tmp_path, "fl.example.org:8000", "~/chemfl/certs/ca.crt")
    out = tmp_path / "server"
    assert run_cli("superlink", path, "--out", out, "--flwr-home", tmp_path / "home") == 0
    data = json.loads((out / "superlink.json").read_text())
    assert SuperLinkSetup.load(out).superlink_port == 9093
    del data["exposure"], data["internal_port"]
    (out / "superlink.json").write_text(json.dumps(data))
    old = SuperLinkSetup.load(out)
    assert (old.exposure, old.internal_port, old.superlink_port, old.proxy_script) == ("direct", None, 8000, None)


SUPERLINK_ERRORS = {
    "host not in the certificate": (["--host", "other.example.org"], {}, "add --host fl.example.org"),
    "insecure": (
        [],
        {"address": "127.0.0.1:8000", "insecure": True, "root-certificates": "", "keys-dir": ""},
        "insecure = true",
    ),
    "system CAs": ([], {"root-certificates": ""}, 'root-certificates = "" means'),
    "connection name": (["--connection", "not a name"], {}, "connection name"),
    "port": (["--port", "70000"], {}, "--port 70000"),
    "host": (["--host", "https://fl.example.org"], {}, "neither a DNS name nor an IP address"),
    "unknown exposure": ([], {"exposure": "public"}, 'exposure "public" is unknown'),
    "direct on a public address": ([], {"exposure": "direct"}, "--expose-control-api"),
    "direct on a public bind": (
        ["--bind", "0.0.0.0"],
        {"exposure": "direct", "address": "127.0.0.1:8000"},
        "--bind 0.0.0.0: anyone who reaches",
    ),
    "internal port with direct": (
        ["--internal-port", "9000", "--expose-control-api"],
        {"exposure": "direct"},
        "--internal-port applies",
    ),
    "override with fleet-only": (["--expose-control-api"], {}, '--expose-control-api applies to exposure = "direct"'),
    "one port for both": (["--internal-port", "8000"], {}, "--internal-port and --port are both 8000"),
    "internal port": (["--internal-port", "0"], {}, "--internal-port 0 is not a TCP port"),
}


@pytest.mark.parametrize("case", SUPERLINK_ERRORS)
def test_superlink_errors_before_writing(case, tmp_path, capsys):
    arguments, superlink, message = SUPERLINK_ERRORS[case]
    path = facilities_file(
        tmp_path, superlink.pop("address", "fl.example.org:443"), "~/chemfl/certs/ca.crt", superlink=superlink
    )
    out, home = tmp_path / "server", tmp_path / "flwr-home"
    assert run_cli("superlink", path, "--out", out, "--flwr-home", home, *arguments) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not home.exists()


def test_superlink_refuses_a_broken_flwr_config_before_writing(tmp_path, capsys):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text("[superlink\n")
    path = facilities_file(tmp_path, "fl.example.org:443", "~/chemfl/certs/ca.crt")
    assert run_cli("superlink", path, "--out", tmp_path / "server", "--flwr-home", home) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "server").exists()


def test_register_says_to_start_the_superlink_first(tmp_path, capsys):
    port = free_port()
    path = facilities_file(tmp_path, f"127.0.0.1:{port}", tmp_path / "server" / "certs" / "ca.crt")
    internal = free_port()
    argv = ["--out", tmp_path / "server", "--flwr-home", tmp_path / "home", "--port", port, "--internal-port", internal]
    assert run_cli("superlink", path, *argv) == 0
    capsys.readouterr()
    assert run_cli("register", tmp_path / "server") == 2
    error = capsys.readouterr().err
    assert f"127.0.0.1:{internal} is not reachable" in error and "superlink.sh first" in error
    assert f"ssh -N -L {internal}:127.0.0.1:{internal}" in error  # exposure fleet-only: the Control API is local
    assert run_cli("register", tmp_path / "nowhere") == 2
    assert "chemfl launch superlink" in capsys.readouterr().err
    setup = json.loads((tmp_path / "server" / "superlink.json").read_text())
    assert setup["supernodes"] == {"polaris": ["polaris-0", "polaris-1"], "perlmutter": ["perlmutter-0"]}
