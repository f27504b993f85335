"""`chemfl launch register`: register every SuperNode key of a `launch superlink` set-up with the running
SuperLink; keys it already knows count as done, so a rerun is safe."""

from __future__ import annotations

import argparse
from pathlib import Path

from chemfl.errors import ChemFLError
from chemfl.launcher.commands.superlink import SuperLinkSetup, flwr_executable
from chemfl.launcher.superlink import RegisterReport, check_superlink, register_supernodes


def register_keys(server: Path, flwr_home: Path | None = None) -> RegisterReport:
    """`flwr supernode register` for each key of the set-up in `server`; returns the RegisterReport."""
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
        where = ""
        if setup.exposure == "fleet-only":
            # The Control API (key registration) is on 127.0.0.1 of the SuperLink host only: the proxy refuses it.
            where = (
                f"; exposure fleet-only: register on the SuperLink host, or open ssh -N -L "
                f"{setup.internal_port}:127.0.0.1:{setup.internal_port} <SuperLink host> first"
            )
        raise ChemFLError(f"{error} (start {setup.script} first, then register{where})") from None
    return register_supernodes(
        setup.public_keys(), setup.connection, flwr_home=flwr_home or setup.flwr_home, flwr=flwr_executable("flwr")
    )


def run(args: argparse.Namespace) -> int:
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
