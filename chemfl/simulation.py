"""`chemfl simulate RECIPE`: `flwr run` on the simulation engine with a private, managed SuperLink.

What it adds to a bare `flwr run . --run-config RECIPE --stream`: a Flower home of its own
(`.flwr/` under the working folder) whose local connection simulates one SuperNode per facility,
fresh ports so a SuperLink left running elsewhere is never silently reused, runtime dependency
installation off (the environment is complete), and the SuperLink stopped when the run ends.
Relative paths in the recipe resolve against the working folder, where the SuperLink starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chemfl.config import Scalar, resolve, split_list
from chemfl.errors import ChemFLError
from chemfl.files import write_file_atomically


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_facilities(recipe: Path) -> int:
    from flwr.common.config import parse_config_args

    return len(split_list(str(resolve(parse_config_args([str(recipe)]))["data.facilities"])))


def parse_overrides(items: list[str]) -> dict[str, Scalar]:
    """`["strategy.name=fedbuff", "train.lr=0.01"]` -> typed values (TOML literals, else strings);
    unknown keys and wrong types are errors, as in a recipe."""
    overrides: dict[str, Scalar] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ChemFLError(f"--set {item!r} must be key=value, e.g. --set strategy.name=fedbuff")
        try:
            overrides[key.strip()] = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = text
    resolve(overrides)
    return overrides


def merged_recipe(recipe: Path, overrides: dict[str, Scalar], folder: Path) -> Path:
    """The recipe with `overrides` applied, as a flat TOML file under `folder` (flwr reads one file)."""
    from flwr.common.config import parse_config_args

    values = {**parse_config_args([str(recipe)]), **overrides}
    resolve(values)
    lines = [f"{key} = {toml_literal(value)}" for key, value in values.items()]
    target = folder / f"{recipe.stem}.merged.toml"
    write_file_atomically(target, "\n".join(lines) + "\n")
    return target


def toml_literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    return repr(value)


@dataclass
class Simulation:
    """How a simulation ended: flwr's exit code and output, and the run's final status as the
    SuperLink recorded it. `returncode` is non-zero unless the run completed."""

    returncode: int
    stdout: str | None
    stderr: str | None
    status: str  # e.g. "finished:completed", "finished:failed", or why it is unknown
    details: str = ""


def simulate(
    recipe: Path,
    app_dir: Path,
    workdir: Path,
    num_supernodes: int | None = None,
    cpus_per_client: int = 2,
    clients_at_once: int | None = None,
    capture: bool = False,
    timeout: float | None = None,
    overrides: dict[str, Scalar] | None = None,
) -> Simulation:
    """`flwr run APP --run-config RECIPE --stream` on a managed SuperLink of this invocation's own:
    its own Flower home (`.flwr/simulate-<random>` under `workdir`, removed when the run completed)
    and fresh ports, so two
    simulations in one folder never share or stop each other's SuperLink."""
    recipe, app_dir, workdir = Path(recipe).resolve(), Path(app_dir).resolve(), Path(workdir).resolve()
    (workdir / ".flwr").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="simulate-", dir=workdir / ".flwr"))
    if overrides:
        recipe = merged_recipe(recipe, overrides, home)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        f"options.num-supernodes = {num_supernodes or recipe_facilities(recipe)}\n"
        f"options.backend.client-resources.num-cpus = {cpus_per_client}\n"
        "options.backend.client-resources.num-gpus = 0\n"
        # Ray runs as many ClientApps at once as its CPU count allows: by default the real cores;
        # `clients_at_once` oversubscribes them (facilities that mostly wait, e.g. emulated ones).
        + (f"options.backend.init-args.num-cpus = {clients_at_once * cpus_per_client}\n" if clients_at_once else "")
    )
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [str(bin_dir / "flwr"), "run", str(app_dir), "--run-config", str(recipe), "--stream"]
    groups: set[int] = set()  # the managed SuperLink's process groups: its children outlive it
    try:
        done = run_watching(command, workdir, env, capture, timeout, lambda: groups.update(superlink_pids(home)))
        status, details = final_status(home, env, workdir)
    finally:
        groups.update(superlink_pids(home))
        stop_process_groups(groups)
    completed = status.endswith(COMPLETED)
    if completed:
        shutil.rmtree(home, ignore_errors=True)
    else:  # keep the SuperLink's log for the post-mortem
        details = f"{details} (SuperLink log: {home / 'local-superlink' / 'superlink.log'})".strip()
    returncode = done.returncode if completed else (done.returncode or 1)
    return Simulation(returncode, done.stdout, done.stderr, status, details)


COMPLETED = ":completed"


def final_status(home: Path, env: dict, workdir: Path) -> tuple[str, str]:
    """The newest run's status from the SuperLink (`flwr ls --format json`), while it still runs."""
    if not superlink_pids(home):
        return "superlink-died", "the SuperLink was gone before the run ended"
    listing = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "ls", "--format", "json"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown", f"flwr ls did not answer: {listing.stderr.strip()[-500:]}"
    if not runs:
        return "no-run", "the SuperLink has no run: flwr run failed before submitting it"
    newest = max(runs, key=lambda run: int(run["run-id"]))
    return str(newest["status"]), str(newest.get("status-details") or "")


def superlink_pids(home: Path) -> list[int]:
    """The managed SuperLink of `home`: its command line names the home's database."""
    marker = str(home / "local-superlink")
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    pids = []
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args and "flower-superlink" in args:
            pids.append(int(pid))
    return pids


def run_watching(
    command: list[str], cwd: Path, env: dict, capture: bool, timeout: float | None, watch: Callable[[], None]
) -> subprocess.CompletedProcess:
    """subprocess.run, calling `watch` every second while the command runs."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        streams = {"stdout": out, "stderr": err} if capture else {}
        process = subprocess.Popen(command, cwd=cwd, env=env, text=True, **streams)
        deadline = None if timeout is None else time.monotonic() + timeout
        while process.poll() is None:
            watch()
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(command, timeout)
            time.sleep(1)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            command, process.returncode, out.read() if capture else None, err.read() if capture else None
        )


def stop_process_groups(groups: set[int]) -> None:
    """Stop the managed SuperLink and everything it started (SuperExec, the simulation and its Ray
    processes). flwr starts it in a session of its own, so its process group (its pid) is exactly
    that, and stays valid after the SuperLink itself died. SIGTERM first, SIGKILL after 10 s."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal_number)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_group_alive(group) for group in groups):
            time.sleep(0.2)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True
