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

This module only declares the options; each subcommand runs from chemfl.launcher.commands.<name>,
imported when that subcommand runs, so `--help` never waits for cryptography, jinja2 or the watcher.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

DEFAULT_CONNECTION = "chemfl"  # the flwr connection `launch superlink` writes


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
    _add_superlink(actions)
    _add_register(actions)
    _add_submit(actions)
    _add_status(actions)
    _add_stop(actions)


def _add_superlink(actions: argparse._SubParsersAction) -> None:
    superlink = actions.add_parser(
        "superlink",
        help="SuperLink side: TLS certificates, SuperNode keys, superlink.sh, proxy.sh, the flwr connection",
        description="Writes OUT/certs (a CA and a server certificate for --host), OUT/keys (one key per SuperNode "
        "of every facility, named <facility>-<index>), OUT/superlink.sh (flower-superlink with TLS, SuperNode "
        "authentication, a database, runtime dependency installation off) and the flwr connection entry; prints "
        'what to copy to each facility. With the facilities file\'s [superlink] exposure = "fleet-only" (the '
        "default) the SuperLink listens on 127.0.0.1:--internal-port and OUT/proxy.sh runs nginx (OUT/proxy.conf) "
        "on --port, forwarding only the Fleet API that SuperNodes use; `flwr run` and `launch register` then go to "
        "127.0.0.1 on the SuperLink host (or through ssh -L). Rerunning keeps the CA and the keys (SuperNodes keep "
        "their identity) and renews the server certificate.",
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
        help="folder for certificates, keys, superlink.sh and proxy.sh (default: server)",
    )
    superlink.add_argument(
        "--port",
        type=int,
        default=8000,
        help="the public port SuperNodes reach (default: 8000, Flower's): nginx's with exposure fleet-only (the "
        "default), flower-superlink's own with exposure direct",
    )
    superlink.add_argument(
        "--internal-port",
        type=int,
        default=None,
        metavar="PORT",
        help="exposure fleet-only: the port flower-superlink listens on, on 127.0.0.1 only; `flwr run` and "
        "`launch register` use it there or through ssh -L (default: 9093)",
    )
    superlink.add_argument(
        "--bind",
        default=None,
        help="address the public port binds (default: 0.0.0.0, every interface; with exposure direct on a local "
        "address: 127.0.0.1)",
    )
    superlink.add_argument(
        "--expose-control-api",
        action="store_true",
        help='allow exposure = "direct" with a non-local address or bind: the SuperLink\'s Control API (flwr run: '
        "code every SuperNode executes) is then open to whoever reaches the port; only on trusted networks",
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
        help="where `flwr run` and `register` reach the SuperLink (default: 127.0.0.1:--internal-port with exposure "
        "fleet-only, the [superlink] host with --port with exposure direct)",
    )
    superlink.add_argument(
        "--flwr-home",
        type=Path,
        default=None,
        help="Flower home holding the connection's config.toml (default: $FLWR_HOME or ~/.flwr)",
    )
    superlink.set_defaults(handler=_runs("superlink"))


def _add_register(actions: argparse._SubParsersAction) -> None:
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
    register_keys.set_defaults(handler=_runs("register"))


def _add_submit(actions: argparse._SubParsersAction) -> None:
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
    submit.set_defaults(handler=_runs("submit"))


def _add_status(actions: argparse._SubParsersAction) -> None:
    status = actions.add_parser("status", help="each facility's job, attempts and last event in a launch folder")
    status.add_argument("launch_dir", type=Path, metavar="LAUNCH_DIR")
    status.add_argument(
        "--events", type=int, default=0, metavar="N", help="also print the last N events of launch.jsonl"
    )
    status.set_defaults(handler=_runs("status"))


def _add_stop(actions: argparse._SubParsersAction) -> None:
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
    stop.set_defaults(handler=_runs("stop"))


def _runs(command: str) -> Callable[[argparse.Namespace], int]:
    """The handler of `chemfl launch <command>`: chemfl.launcher.commands.<command>.run, imported on call."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"chemfl.launcher.commands.{command}").run(args)

    return run
