"""`chemfl simulate RECIPE`: `flwr run` on the simulation engine with a private, managed SuperLink.

What it adds to a bare `flwr run . --run-config RECIPE --stream`: a Flower home of its own
(`.flwr/` under the working folder) whose local connection simulates one SuperNode per facility,
fresh ports so a SuperLink left running elsewhere is never silently reused, runtime dependency
installation off (the environment is complete), and the SuperLink stopped when the run ends.
Relative paths in the recipe resolve against the working folder, where the SuperLink starts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from chemfl.config import resolve, split_list


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_facilities(recipe: Path) -> int:
    from flwr.common.config import parse_config_args

    return len(split_list(str(resolve(parse_config_args([str(recipe)]))["data.facilities"])))


def simulate(recipe: Path, app_dir: Path, workdir: Path, num_supernodes: int | None = None,
             cpus_per_client: int = 2, clients_at_once: int | None = None, capture: bool = False, timeout: float | None = None
             ) -> subprocess.CompletedProcess:
    recipe, app_dir, workdir = Path(recipe).resolve(), Path(app_dir).resolve(), Path(workdir).resolve()
    home = workdir / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
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
