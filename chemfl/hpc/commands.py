"""Scheduler command-line tools (qsub, qstat, sbatch, ...) run from Python: looked up on PATH, output
captured, and a hang bounded, so a stuck scheduler never stalls the watcher or a SuperNode."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from chemfl.errors import ChemFLError

# Seconds a scheduler command may take before we call the query failed (the watcher retries later).
COMMAND_TIMEOUT_SECONDS = 60


def require_on_path(command: str) -> str:
    """The full path of `command`, or a ChemFLError saying where chemfl launch has to run."""
    path = shutil.which(command)
    if path is None:
        raise ChemFLError(
            f"`{command}` is not on PATH: run chemfl launch on the facility's login node, or use backend = globus"
        )
    return path


def run_command(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a scheduler command, capturing its output; a missing command or a hang is a ChemFLError."""
    require_on_path(argv[0])
    try:
        return subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise ChemFLError(f"`{' '.join(argv)}` did not answer within {COMMAND_TIMEOUT_SECONDS} s") from error
