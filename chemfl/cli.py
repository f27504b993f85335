"""The `chemfl` command. `chemfl data build|verify|baselines`; more rooms add their own verbs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from chemfl.data_prep import cli as data_cli
from chemfl.errors import ChemFLError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chemfl", description="Federated LoRA fine-tuning of chemistry LLMs across supercomputers."
    )
    verbs = parser.add_subparsers(dest="room", required=True, metavar="{data}")
    data_cli.register(verbs)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ChemFLError as error:
        print(f"chemfl: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
