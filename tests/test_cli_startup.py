"""`chemfl ... --help` must answer at once: declaring the subcommands imports none of the heavy stacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = (
    "torch",
    "transformers",
    "datasets",
    "flwr_datasets",
    "matplotlib",
    "cryptography",
    "jinja2",
    "globus_compute_sdk",
)


@pytest.mark.parametrize("argv", [["--help"], ["launch", "--help"], ["launch", "submit", "--help"], ["data", "--help"]])
def test_help_imports_no_heavy_module(argv):
    probe = (
        "import sys\n"
        "from chemfl.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('loaded:', [name for name in {HEAVY!r} if name in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "loaded: []"
