"""The fleet-only front of a SuperLink: nginx terminates TLS on the public port and forwards only the
Fleet API (what flower-supernode calls) to the SuperLink, which listens on 127.0.0.1 only.

Why (checked against flwr 1.42, site-packages/flwr is the ground truth): `flower-superlink` serves
three FastAPI routers from ONE uvicorn port (`flwr/superlink/main.py::create_app`): `/v1/fleet`
(SuperNodes), `/v1/control` (`flwr run`, `flwr ls`, `flwr stop`, `flwr supernode register`, ...) and
`/v1/runtime` (the ServerApp's and ClientApps' runtime), plus `/health` and FastAPI's `/docs` and
`/openapi.json`. The open-source Control API has no account authentication
(`NoOpControlAuthnPlugin`), and `flwr run` ships code every SuperNode executes: whoever reaches that
port can run code on the facilities' compute nodes. TLS and SuperNode keys do not stop it. The gRPC
Fleet/Control servers of older releases start only with FLWR_INTERNAL_GRPC_*_API=1 and the gRPC
health server only with --health-server-address (`flwr/superlink/cli/flower_superlink.py`), so
binding uvicorn to 127.0.0.1 leaves nothing else listening.

What SuperNodes call (`flwr/supernode/fleet_http_client.py`, `FleetHttpClient`; the same twelve
routes as `flwr/superlink/routers/fleet/router.py` and `PROTOBUF_REQUEST_TYPES`): POST
/v1/fleet/<call> for each of FLEET_CALLS, protobuf bodies, over httpx.Client() -- HTTP/1.1 (no
http2=True), follow_redirects, 30 s timeout (heartbeats 5 s), no streaming calls, no /health.
Node authentication (`supernode/node_auth_http_interceptor.py`, checked in
`superlink/routers/fleet/node_auth.py`) is three request headers, `flwr-public-key`,
`flwr-timestamp`, `flwr-signature` (an ECDSA signature of the timestamp only: not of the path, the
host or the body), plus the version headers `flwr-package-name`, `flwr-package-version`,
`flwr-component-name`; the SuperLink may answer with `flwr-version-incompatibility-message`. nginx
passes all of them unchanged (hyphens only: `underscores_in_headers` does not apply). The client's
retry (`supercore/retry/http_retry.py`) retries 502/503/504 (the proxy while the SuperLink
restarts), treats 401 as "stop the SuperNode" and 403 as "run not running": the proxy never answers
a well-formed Fleet call with either.

The allow-list matches the raw request line ($request_uri: no query string, no percent-encoding, no
`..`, no doubled slashes), so nginx's URI normalisation cannot make a refused path look allowed
while the SuperLink sees another; everything else gets 403 from nginx and never reaches the
SuperLink. `/health` (GET/HEAD, an empty 200) is the one other path forwarded: SuperNodes do not
need it, but `chemfl launch submit`'s check (check_superlink) uses it to tell "proxy up, SuperLink
down" (502) from a working SuperLink.

Bodies: Arrays travel as objects of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), FABs at most
10 MB (FAB_MAX_SIZE); MAX_BODY leaves room for a raised chunk size and bounds what one request can
send. Neither request nor response is spooled to disk (proxy_request_buffering off, proxy_buffering
off): nobody unauthenticated fills the SuperLink host's disk, and nginx's worker processes (an
unprivileged user when nginx starts as root) need no writable folder.
"""

from __future__ import annotations

from chemfl.errors import ChemFLError

FLEET_CALLS = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
INTERNAL_DEFAULT_PORT = 9093  # the SuperLink on 127.0.0.1 (Flower's former Control API port)
MAX_BODY = "256m"  # client_max_body_size
READ_TIMEOUT_SECONDS = 300  # proxy_read_timeout/proxy_send_timeout: far above the client's 30 s per call
CONFIG_FILE, SCRIPT_FILE, STATE_DIR = "proxy.conf", "proxy.sh", "proxy"


def _listen(bind: str, port: int) -> str:
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def proxy_config(*, bind: str, port: int, internal_port: int, address: str) -> str:
    """nginx.conf for `nginx -p OUT/ -c OUT/proxy.conf`: every path relative to OUT (the certificates
    relative to the file's folder, the rest to the prefix), so the folder can move."""
    for name, value in (("port", port), ("internal port", internal_port)):
        if not isinstance(value, int) or not 0 < value < 65536:
            raise ChemFLError(f"proxy {name} {value!r} is not a TCP port: give 1-65535")
    if port == internal_port:
        raise ChemFLError(f"the public port and the SuperLink's internal port are both {port}: give two ports")
    calls = "|".join(FLEET_CALLS)
    refusal = (
        "chemfl proxy: only the Fleet API is served on this port. Run flwr (run, ls, stop, supernode register) "
        f"on the SuperLink host against 127.0.0.1:{internal_port}, or through "
        f"ssh -L {internal_port}:127.0.0.1:{internal_port} <SuperLink host>."
    )
    return f"""\
# ChemFL fleet-only proxy, written by `chemfl launch superlink`: SuperNodes connect to {address}.
# Public: TLS on {_listen(bind, port)} with certs/server.crt. Forwarded to the SuperLink on
# 127.0.0.1:{internal_port} (TLS, verified against certs/ca.crt): POST /v1/fleet/<call> for the twelve
# calls flower-supernode makes, and GET/HEAD /health. Everything else (the Control API that `flwr run`,
# `flwr ls`, `flwr supernode register` use, the Runtime API, /docs) is refused here with 403.
# Start with proxy.sh (nginx in the foreground; no root needed for ports >= 1024).
daemon off;
master_process on;
worker_processes 2;
pid {STATE_DIR}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 1024;
}}

http {{
    server_tokens off;
    default_type text/plain;
    log_format chemfl '$time_iso8601 $remote_addr "$request" $status $request_length $bytes_sent '
                      '$request_time $upstream_response_time';
    access_log {STATE_DIR}/access.log chemfl;
    # Never used (nothing is spooled: see proxy_*buffering below), but nginx wants writable paths.
    client_body_temp_path {STATE_DIR}/tmp/body;
    proxy_temp_path {STATE_DIR}/tmp/proxy;
    fastcgi_temp_path {STATE_DIR}/tmp/fastcgi;
    uwsgi_temp_path {STATE_DIR}/tmp/uwsgi;
    scgi_temp_path {STATE_DIR}/tmp/scgi;

    # The raw request line, not nginx's normalised $uri: exact paths only.
    map $request_uri $chemfl_route {{
        default "";
        "~^/v1/fleet/({calls})$" fleet;
        "{HEALTH_PATH}" health;
    }}

    upstream chemfl_superlink {{
        server 127.0.0.1:{internal_port};
        keepalive 32;
        # Below uvicorn's 5 s keep-alive: never reuse a connection the SuperLink is closing (a POST
        # that fails that way is not retried, and the SuperNode would see a 502).
        keepalive_timeout 4s;
    }}

    server {{
        # HTTP/1.1 only (no http2): flower-supernode's httpx client speaks HTTP/1.1.
        listen {_listen(bind, port)} ssl;
        ssl_certificate certs/server.crt;
        ssl_certificate_key certs/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:chemfl_tls:1m;
        ssl_session_tickets off;

        client_max_body_size {MAX_BODY};
        client_header_timeout 30s;
        client_body_timeout 120s;
        send_timeout 120s;
        keepalive_timeout 75s;

        if ($chemfl_route = "") {{
            return 403 "{refusal}\\n";
        }}

        # Towards the SuperLink: TLS checked against our CA, HTTP/1.1 with kept-alive connections; nothing
        # spooled to disk either way; the client's address for the SuperLink's access log (uvicorn trusts
        # X-Forwarded-* from 127.0.0.1 only; set here, never appended to what the client sent).
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $remote_addr;
        proxy_set_header X-Forwarded-Proto https;
        proxy_set_header Forwarded "";
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_connect_timeout 10s;
        proxy_send_timeout {READ_TIMEOUT_SECONDS}s;
        proxy_read_timeout {READ_TIMEOUT_SECONDS}s;
        proxy_ssl_trusted_certificate certs/ca.crt;
        proxy_ssl_verify on;
        proxy_ssl_name localhost;
        proxy_ssl_protocols TLSv1.2 TLSv1.3;
        proxy_ssl_session_reuse on;

        location {FLEET_PREFIX} {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://chemfl_superlink;
        }}

        location = {HEALTH_PATH} {{
            limit_except GET {{
                deny all;
            }}
            proxy_pass https://chemfl_superlink;
        }}

        location / {{
            return 403;
        }}
    }}
}}
"""


def proxy_script(*, address: str, port: int, internal_port: int) -> str:
    """proxy.sh: nginx in the foreground with its own pid, logs and temp folders under OUT/proxy/."""
    return f"""\
#!/bin/bash
# ChemFL fleet-only proxy: SuperNodes connect to {address} (port {port}); nginx forwards only their
# Fleet API calls to the SuperLink on 127.0.0.1:{internal_port} (superlink.sh). Keep both running.
# nginx >= 1.15.3 from the OS packages (apt-get install nginx, dnf install nginx), or CHEMFL_NGINX=/path/to/nginx.
# Logs: errors on stderr, requests in proxy/access.log. Stop: kill this process (nginx's master).
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
nginx="${{CHEMFL_NGINX:-}}"
if [[ -z $nginx ]]; then
  nginx="$(command -v nginx || true)"
  for candidate in /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx; do
    [[ -n $nginx ]] && break
    [[ -x $candidate ]] && nginx=$candidate
  done
fi
if [[ -z $nginx || ! -x $nginx ]]; then
  echo "chemfl: nginx not found: install it (Debian/Ubuntu: sudo apt-get install nginx; RHEL/Rocky:" \\
    "sudo dnf install nginx) or set CHEMFL_NGINX=/path/to/nginx" >&2
  exit 1
fi
mkdir -p "$here/{STATE_DIR}/tmp"
# Before the configuration is read nginx logs to its built-in error log, which a normal user may not
# be allowed to open: send that to stderr too (-e, nginx >= 1.19.5).
early=()
if "$nginx" -h 2>&1 | grep -q -- '-e filename'; then
  early=(-e stderr)
fi
"$nginx" ${{early[@]+"${{early[@]}}"}} -t -q -p "$here/" -c "$here/{CONFIG_FILE}"
exec "$nginx" ${{early[@]+"${{early[@]}}"}} -p "$here/" -c "$here/{CONFIG_FILE}"
"""
