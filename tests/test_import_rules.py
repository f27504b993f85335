"""The dependency rules between rooms, checked in the imports themselves: modules are imported in a
fresh interpreter and `sys.modules` is inspected (grep cannot see what an import pulls in).

One interpreter per rule imports every module of its room: what a module loads does not depend on
what was imported before it, so the room's union is free of a forbidden module exactly when each of
its modules is; when it is not, each module is imported alone to name the offenders."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import chemfl

ROOT = Path(chemfl.__file__).resolve().parent


def modules(room: str) -> list[str]:
    """Every module of a room (a package under chemfl/, or one module)."""
    path = ROOT / room.replace("chemfl.", "", 1).replace(".", "/")
    if not path.is_dir():
        return [room]
    found = pkgutil.walk_packages([str(path)], prefix=f"{room}.")
    return [room] + [info.name for info in found if not info.name.endswith(".__main__")]  # __main__ runs


def loaded_after_import(*module_names: str) -> set[str]:
    code = f"import sys, json, {', '.join(module_names)}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def offenders(loaded: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in loaded if any(name == f or name.startswith(f + ".") for f in forbidden))


RULES = [
    # (room, what it must not load, why)
    ("chemfl.server_app.aggregation", ("torch", "flwr"), "aggregation maths are pure numpy"),
    ("chemfl.server_app.rules", ("torch", "flwr"), "strategy rules need neither torch nor Flower"),
    ("chemfl.server_app.strategy_spec", ("torch", "flwr"), "strategy settings are plain data"),
    ("chemfl.protocol", ("torch", "flwr"), "the message and metrics contract is plain data"),
    ("chemfl.hpc", ("torch", "flwr", "chemfl.launcher"), "HPC facts are a neutral room"),
    ("chemfl.launcher", ("torch", "chemfl.server_app", "chemfl.client_app"), "the launcher never imports torch"),
    ("chemfl.data_prep", ("flwr", "chemfl.server_app", "chemfl.client_app"), "data_prep knows no Flower apps"),
    ("chemfl.report", ("torch", "flwr"), "the report only reads run folders"),
    ("chemfl.server_app", ("chemfl.launcher",), "nothing on the server side imports the launcher"),
    (
        "chemfl.server_app.baselines",
        ("chemfl.client_app",),
        "baselines read shards through data_prep, not the ClientApp",
    ),
    ("chemfl.emulation", ("chemfl.launcher",), "the emulator replays launch logs through chemfl.hpc"),
    ("chemfl.client_app", ("chemfl.launcher",), "the ClientApp reads walltime through chemfl.hpc"),
    ("chemfl.client_app.app", ("torch", "transformers"), "Flower starts the ClientApp per message: keep it light"),
    ("chemfl.client_app.relay", ("torch", "transformers"), "the relay to the facility trainer stays light"),
    ("chemfl.trainer.channel", ("torch", "flwr"), "the trainer's channel is numpy and sockets"),
    ("chemfl.trainer.ranks", ("torch", "flwr"), "rank discovery reads the environment only"),
    ("chemfl.trainer", ("chemfl.launcher", "chemfl.server_app"), "the trainer needs neither launcher nor server"),
    ("chemfl.checks", ("chemfl.launcher",), "run checks are server-side"),
]


def room_offenders(room: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """{module: the forbidden modules it loads} for the offending modules of a room."""
    room_modules = modules(room)
    if not offenders(loaded_after_import(*room_modules), forbidden):
        return {}
    found = {module: offenders(loaded_after_import(module), forbidden) for module in room_modules}
    return {module: names for module, names in found.items() if names}


@pytest.mark.parametrize("room, forbidden, why", RULES, ids=[room for room, _, _ in RULES])
def test_every_module_of_a_room_loads_nothing_it_forbids(room, forbidden, why):
    found = room_offenders(room, forbidden)
    assert found == {}, f"{why}: { ({module: names[:5] for module, names in found.items()}) }"


def test_the_check_itself_sees_a_forbidden_import_and_names_the_module():
    # The ClientApp's local path trains, so it loads torch and Flower; the relay loads neither.
    assert len(modules("chemfl.client_app")) > 3  # a room is every module under it
    found = room_offenders("chemfl.client_app", ("torch",))
    assert "chemfl.client_app.local" in found and "chemfl.client_app.relay" not in found
    assert offenders(loaded_after_import("chemfl.client_app.local"), ("flwr",))
