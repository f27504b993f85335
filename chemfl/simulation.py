"""`chemfl simulate RECIPE`: `flwr run` on the simulation engine with a private, managed SuperLink.

What it adds to a bare `flwr run . --run-config RECIPE --stream`: a Flower home of its own
(`.flwr/` under the working folder) whose local connection simulates one SuperNode per facility,
fresh ports so a SuperLink left running elsewhere is never silently reused, runtime dependency
installation off (the environment is complete), and the SuperLink stopped when the run ends.
Relative paths in the recipe resolve against the working folder, where the SuperLink starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
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
) -> subprocess.CompletedProcess:
    recipe, app_dir, workdir = Path(recipe).resolve(), Path(app_dir).resolve(), Path(workdir).resolve()
    home = workdir / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
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
    try:
        return subprocess.run(command, cwd=workdir, env=env, capture_output=capture, text=True, timeout=timeout)
    finally:
        stop_superlink(home)


def stop_superlink(home: Path) -> None:
    """SIGTERM the managed SuperLink of `home` (its SuperExec and simulation follow it)."""
    marker = str(home / "local-superlink")
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    stopped = False
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args and "flower-superlink" in args:
            os.kill(int(pid), signal.SIGTERM)
            stopped = True
    if stopped:
        time.sleep(1)
