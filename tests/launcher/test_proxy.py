"""The fleet-only proxy (chemfl.launcher.proxy): what it forwards, checked against flwr, and, REAL, a
SuperLink behind the nginx that `chemfl launch superlink` renders.

The REAL test, everything on 127.0.0.1: `chemfl launch superlink` (exposure fleet-only, the default)
writes certificates, a SuperNode key, superlink.sh (flower-superlink with TLS and SuperNode
authentication on 127.0.0.1:<internal>) and proxy.conf/proxy.sh (nginx with TLS on <public>); both
scripts run as written. Through the public port: the Control and Runtime APIs, /docs and tricks on the
path are refused by nginx; a Fleet call reaches the SuperLink (401 without a node signature); a body
over the limit gets 413; `flwr ls` and `flwr run` are refused. On the internal port the same `flwr`
calls work: `chemfl launch register` registers the key, and a run of a small Flower app (no torch)
sends a 12 MB array to a SuperNode connected through the proxy, which answers it (so activate-node,
heartbeats, get-run, get-fab, pull/push-messages, pull/push-object with several 5 MiB
chunks each way all pass nginx, and the node's signature headers arrive intact). A SuperNode with an
unregistered key is refused through the proxy. About 30 s.

Without nginx the REAL test is skipped, saying how to install it (.ci/run installs it in CI).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from chemfl.cli import main
from chemfl.errors import ChemFLError
from chemfl.launcher import proxy
from chemfl.launcher.superlink import check_superlink, make_supernode_keys

BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
)
NO_NGINX = (
    "nginx is not installed: the fleet-only proxy test needs it (Debian/Ubuntu: apt-get install -y nginx; "
    "RHEL: dnf install nginx); .ci/run installs it in CI"
)
needs_flower = pytest.mark.skipif(
    not all((BIN / name).exists() for name in ("flower-superlink", "flower-supernode", "flwr")),
    reason="Flower's deployment commands are not installed beside this Python",
)
PAYLOAD_FLOATS = 3_000_000  # 12 MB of float32: three 5 MiB chunks each way


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- what the proxy lets through, against flwr's own route tables ------------------------------------


def test_the_allow_list_is_exactly_the_fleet_api_flwr_serves_and_supernodes_call():
    import inspect

    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
    from flwr.superlink.routers.fleet.router import router
    from flwr.supernode.fleet_http_client import FleetHttpClient

    allowed = {proxy.FLEET_PREFIX + call for call in proxy.FLEET_CALLS}
    assert allowed == {route.path for route in router.routes}  # the SuperLink's Fleet routes
    assert allowed == set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(FleetHttpClient)))
    assert allowed == {path for method, path in PROTOBUF_REQUEST_TYPES if path.startswith("/v1/fleet/")}
    assert all(method == "POST" for method, path in PROTOBUF_REQUEST_TYPES if path in allowed)
    assert all(route.methods == {"POST"} for route in router.routes)


def test_the_config_allows_only_those_paths_and_keeps_the_superlink_on_loopback():
    config = proxy.proxy_config(bind="0.0.0.0", port=8000, internal_port=9093, address="fl.example.org:8000")
    assert "listen 0.0.0.0:8000 ssl;" in config and "http2" not in config.replace("no http2", "")
    assert "server 127.0.0.1:9093;" in config
    assert f'"~^/v1/fleet/({"|".join(proxy.FLEET_CALLS)})$" fleet;' in config
    assert "map $request_uri $chemfl_route" in config  # the raw request line, not the normalised $uri
    assert f"client_max_body_size {proxy.MAX_BODY};" in config and "proxy_ssl_verify on;" in config
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in config  # replaced, never appended to
    v6 = proxy.proxy_config(bind="::", port=443, internal_port=9093, address="[::1]:443")
    assert "listen [::]:443 ssl;" in v6
    with pytest.raises(ChemFLError, match="both 9093"):
        proxy.proxy_config(bind="0.0.0.0", port=9093, internal_port=9093, address="x:9093")


@pytest.mark.skipif(NGINX is None, reason=NO_NGINX)
def test_nginx_accepts_the_rendered_config(tmp_path):
    """`nginx -t` on a set-up written by `chemfl launch superlink` (no root needed, nothing started)."""
    server = launch_superlink(tmp_path, public=free_port(), internal=free_port())
    (server / proxy.STATE_DIR / "tmp").mkdir(parents=True)
    done = subprocess.run(
        [NGINX, "-t", "-p", f"{server}/", "-c", str(server / proxy.CONFIG_FILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert subprocess.run(["bash", "-n", str(server / proxy.SCRIPT_FILE)]).returncode == 0


# --- helpers for the REAL test -----------------------------------------------------------------------


def launch_superlink(tmp_path: Path, public: int, internal: int, **superlink: object) -> Path:
    """`chemfl launch superlink` for one local facility "a" (one SuperNode key, a-0); returns --out."""
    server = tmp_path / "server"
    facilities = tmp_path / "facilities.toml"
    facilities.write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "address": f"127.0.0.1:{public}",
                    "root-certificates": str(server / "certs" / "ca.crt"),
                    "keys-dir": str(server / "keys"),
                    **superlink,
                },
                "facilities": {
                    "a": {"profile": "local", "layout": "per-gpu", "walltime": "00:10:00", "data-path": str(tmp_path)}
                },
            }
        )
    )
    argv = ["launch", "superlink", str(facilities), "--out", str(server), "--port", str(public)]
    argv += ["--internal-port", str(internal), "--bind", "127.0.0.1", "--connection", "chemfl-test"]
    assert main([*argv, "--flwr-home", str(tmp_path / "flwr-cli")]) == 0
    return server


class Started:
    """Process groups started by the test, stopped (TERM, then KILL) whatever happens."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
        with log.open("w") as stream:
            process = subprocess.Popen(
                argv,
                stdout=stream,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kwargs,
            )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


@pytest.fixture
def started() -> Iterator[Started]:
    processes = Started()
    try:
        yield processes
    finally:
        processes.stop_all()


def wait_for(predicate: Callable[[], object], seconds: float, what: str, logs: Callable[[], str]) -> object:
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {seconds:.0f} s)\n{logs()}")
        time.sleep(0.3)


def request(port: int, ca: Path, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One HTTPS request to 127.0.0.1:`port`, the path sent exactly as given; (status, body text)."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/protobuf", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def claimed_body_status(port: int, ca: Path, size: int) -> int:
    """The status nginx answers to a Fleet call that announces a `size`-byte body (none is sent)."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(
            f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {size}\r\n"
            "Content-Type: application/protobuf\r\n\r\n".encode()
        )
        return int(tls.recv(1024).split(b" ", 2)[1])


def rendered_probe(address: str, ca: Path) -> str:
    """The `probe_superlink` function of a batch script rendered for a PBS facility (local ones skip it)."""
    from chemfl.launcher.facilities import parse_plan
    from chemfl.launcher.render import render_script

    plan = parse_plan(
        {
            "superlink": {"address": address, "root-certificates": str(ca), "keys-dir": "~/chemfl/keys"},
            "facilities": {
                "p": {
                    "profile": "pbs",
                    "account": "x",
                    "walltime": "00:10:00",
                    "gpus-per-node": 1,
                    "layout": "per-gpu",
                    "proxy": "",
                    "data-path": "/scratch/p",
                }
            },
        }
    )
    script = render_script(plan, plan.facilities[0])
    start = script.index("export CHEMFL_PROBE_ATTEMPTS")
    probe = script[start : script.index("\n}\n", start) + 3]
    return probe.replace("CHEMFL_PROBE_ATTEMPTS:-3", "CHEMFL_PROBE_ATTEMPTS:-1")


SERVER_APP = """
import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    payload = np.arange(int(context.run_config["floats"]), dtype=np.float32)
    messages = [
        Message(RecordDict({"payload": ArrayRecord({"x": Array(payload)})}), dst_node_id=node, message_type="query")
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=90))
    answers = []
    for reply in replies:
        if reply.has_error():
            answers.append({"error": str(reply.error)})
            continue
        back = reply.content["payload"]["x"].numpy()
        answers.append({"node": reply.metadata.src_node_id, "ok": bool(np.array_equal(back, payload + 1))})
    with open(context.run_config["result-file"], "w") as out:
        json.dump({"nodes": nodes, "answers": answers}, out)
"""

CLIENT_APP = """
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def answer(message: Message, context: Context) -> Message:
    x = message.content["payload"]["x"].numpy()
    return Message(RecordDict({"payload": ArrayRecord({"x": Array(x + 1)})}), reply_to=message)
"""


def write_app(folder: Path, result_file: Path) -> Path:
    """A Flower app that sends PAYLOAD_FLOATS float32 to every node and checks each answer is x + 1."""
    package = folder / "proxyprobe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(SERVER_APP)
    (package / "client.py").write_text(CLIENT_APP)
    (folder / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
                "project": {"name": "proxyprobe", "version": "1.0.0", "dependencies": ["flwr", "numpy"]},
                "tool": {
                    "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
                    "flwr": {
                        "app": {
                            "publisher": "chemfl",
                            "components": {"serverapp": "proxyprobe.server:app", "clientapp": "proxyprobe.client:app"},
                            "config": {"floats": PAYLOAD_FLOATS, "result-file": str(result_file)},
                        }
                    },
                },
            }
        )
    )
    return folder


# --- REAL ------------------------------------------------------------------------------------------


@needs_flower
def test_REAL_only_the_fleet_api_passes_the_proxy(tmp_path: Path, started: Started):
    if NGINX is None:
        pytest.skip(NO_NGINX)
    t0 = time.monotonic()
    public, internal = free_port(), free_port()
    server = launch_superlink(tmp_path, public, internal)
    ca = server / "certs" / "ca.crt"
    cli_home = tmp_path / "flwr-cli"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{Path(NGINX).parent}{os.pathsep}{os.environ['PATH']}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    logs_of = [tmp_path / name for name in ("superlink.log", "proxy.log", "node.log", "rogue.log", "run.log")]

    def logs() -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])
            for path in [*logs_of, server / proxy.STATE_DIR / "access.log"]
            if path.is_file()
        )

    # What `chemfl launch superlink` wrote: the SuperLink on 127.0.0.1:internal, the connection there too.
    setup = json.loads((server / "superlink.json").read_text())
    assert (setup["exposure"], setup["internal_port"], setup["connection_address"]) == (
        "fleet-only",
        internal,
        f"127.0.0.1:{internal}",
    )
    assert setup["command"][1:5] == ["--host", "127.0.0.1", "--port", str(internal)]

    # The proxy first: it answers TLS on its own, and check_superlink tells that no SuperLink is behind it.
    started.start(["bash", str(server / proxy.SCRIPT_FILE)], tmp_path / "proxy.log", env=env)

    def proxy_says_superlink_down() -> str:
        try:
            check_superlink(f"127.0.0.1:{public}", ca, insecure=False, timeout=2)
        except ChemFLError as error:
            return "behind it does not" in str(error) and str(error)
        return "up?!"

    assert "HTTP 502" in wait_for(proxy_says_superlink_down, 30, "nginx did not start", logs)
    started.start(
        ["bash", str(server / "superlink.sh")],
        tmp_path / "superlink.log",
        cwd=tmp_path,
        env={**env, "FLWR_HOME": str(tmp_path / "superlink-home")},
    )

    def through_proxy() -> bool:  # TLS by nginx and /health answered by the SuperLink behind it
        try:
            check_superlink(f"127.0.0.1:{public}", ca, insecure=False, timeout=2)
        except ChemFLError:
            return False
        return True

    wait_for(through_proxy, 40, "the SuperLink did not answer through the proxy", logs)
    # The batch jobs' connectivity probe, as rendered (curl with the CA, no proxy), passes through nginx.
    probe = rendered_probe(f"127.0.0.1:{public}", ca)
    probed = subprocess.run(["bash", "-c", f"{probe}\nprobe_superlink"], capture_output=True, text=True, timeout=60)
    assert probed.returncode == 0 and "reachable from" in probed.stdout, probed
    assert main(["launch", "register", str(server)]) == 0  # on 127.0.0.1:internal

    # --- raw requests on the public port ------------------------------------------------------------
    tried = {
        ("POST", "/v1/control/list-runs"): 403,
        ("POST", "/v1/control/start-run"): 403,
        ("POST", "/v1/control/register-node"): 403,
        ("POST", "/v1/runtime/pull-task-input"): 403,
        ("GET", "/docs"): 403,
        ("GET", "/openapi.json"): 403,
        ("GET", "/"): 403,
        ("POST", "/v1/fleet/../control/list-runs"): 403,
        ("POST", "/v1/control/../fleet/get-run"): 403,
        ("POST", "/v1/fleet/%67et-run"): 403,
        ("POST", "/v1//fleet/get-run"): 403,
        ("POST", "/v1/fleet/get-run?x=1"): 403,
        ("POST", "/v1/fleet/get-run/"): 403,
        ("POST", "/v1/fleet/not-a-call"): 403,
        ("GET", "/v1/fleet/get-run"): 403,
        ("POST", "/health"): 403,
        ("GET", "/health"): 200,
        ("POST", "/v1/fleet/get-run"): 401,  # reached the SuperLink, which wants a node signature
    }
    answered = {key: request(public, ca, *key)[0] for key in tried}
    assert answered == tried, logs()
    status, text = request(public, ca, "POST", "/v1/control/list-runs")
    assert f"127.0.0.1:{internal}" in text and "ssh -L" in text
    assert claimed_body_status(public, ca, 300 * 2**20) == 413
    # The same Control call on the internal port reaches the SuperLink.
    assert request(internal, ca, "POST", "/v1/control/list-runs")[0] not in (403, 404)

    # --- flwr against the public port: refused; against the internal one: works ---------------------
    from chemfl.launcher.superlink import write_connection

    write_connection(cli_home, "public", f"127.0.0.1:{public}", ca, False)
    flwr_env = {**env, "FLWR_HOME": str(cli_home)}
    refused = subprocess.run(
        [str(BIN / "flwr"), "ls", "public"], capture_output=True, text=True, env=flwr_env, timeout=60
    )
    assert refused.returncode != 0 and "403" in refused.stdout + refused.stderr, refused
    listed = subprocess.run(
        [str(BIN / "flwr"), "ls", "chemfl-test"], capture_output=True, text=True, env=flwr_env, timeout=60
    )
    assert listed.returncode == 0, listed
    result_file = tmp_path / "result.json"
    app = write_app(tmp_path / "app", result_file)
    refused_run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "public"], capture_output=True, text=True, env=flwr_env, timeout=120
    )
    assert refused_run.returncode != 0 and "403" in refused_run.stdout + refused_run.stderr, refused_run

    # --- a registered SuperNode through the proxy; an unregistered one is refused there --------------
    key = server / "keys" / "a-0"
    rogue = make_supernode_keys(tmp_path / "rogue", ["rogue-0"])["rogue-0"].private_key
    nodes = {}
    for name, private_key in (("node", key), ("rogue", rogue)):
        nodes[name] = started.start(
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{public}",
                "--root-certificates",
                str(ca),
                "--auth-supernode-private-key",
                str(private_key),
                "--port",
                str(free_port()),
                "--max-wait-time",
                "60",
            ],
            tmp_path / f"{name}.log",
            env={**env, "FLWR_HOME": str(tmp_path / f"{name}-home")},
        )
    wait_for(
        lambda: "SuperNode ID:" in (tmp_path / "node.log").read_text(errors="replace"),
        40,
        "the registered SuperNode did not join through the proxy",
        logs,
    )

    run = started.start(
        [str(BIN / "flwr"), "run", str(app), "chemfl-test", "--stream"], tmp_path / "run.log", env=flwr_env
    )
    wait_for(lambda: run.poll() is not None, 120, "flwr run did not finish", logs)
    assert run.returncode == 0, logs()
    wait_for(result_file.is_file, 30, "the ServerApp wrote no result", logs)
    result = json.loads(result_file.read_text())
    assert len(result["nodes"]) == 1 and result["answers"] == [{"node": result["nodes"][0], "ok": True}], logs()

    wait_for(lambda: nodes["rogue"].poll() is not None, 60, "the unregistered SuperNode was not refused", logs)
    rogue_text = (tmp_path / "rogue.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in rogue_text and "SuperNode ID:" not in rogue_text, logs()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in (server / proxy.STATE_DIR / "access.log").read_text()

    # Every Fleet call the node made went through nginx: read it from nginx's own access log.
    access = (server / proxy.STATE_DIR / "access.log").read_text()
    for call in (  # no register-node: with node authentication the key is registered through the Control API
        "activate-node",
        "get-run",
        "get-fab",
        "pull-messages",
        "push-messages",
        "pull-object",
        "push-object",
        "confirm-message-received",
    ):
        assert f'"POST /v1/fleet/{call} HTTP/1.1" 200' in access, call
    print(f"proxy test {time.monotonic() - t0:.0f} s")
