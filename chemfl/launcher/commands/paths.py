"""How the launch subcommands show the folders they were given, and check a launch folder is one."""

from __future__ import annotations

from pathlib import Path

from chemfl.errors import ChemFLError


def shown(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (shorter to read and to copy)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def require_launch(launch_dir: Path) -> None:
    """A folder without launch-state.json is most likely not submit's --out: say which folder to give."""
    if not (Path(launch_dir) / "launch-state.json").is_file():
        raise ChemFLError(
            f"{launch_dir} holds no launch (no launch-state.json); give the --out of chemfl launch submit "
            "(default: launch)"
        )
