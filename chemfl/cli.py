"""The `chemfl` command: `chemfl data build|verify|baselines`, `chemfl simulate`, `chemfl emulate`,
`chemfl eval`, `chemfl report`, `chemfl launch`, `chemfl trainer`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from chemfl.config import resolve

# Each room's cli module only declares its options; its handlers import torch, datasets, matplotlib or
# cryptography when they run, so `chemfl ... --help` answers at once (tests/test_cli_startup.py).
from chemfl.data_prep import cli as data_cli
from chemfl.errors import ChemFLError
from chemfl.launcher import cli as launch_cli
from chemfl.report import cli as report_cli
from chemfl.trainer import cli as trainer_cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chemfl", description="Federated LoRA fine-tuning of chemistry LLMs across supercomputers."
    )
    verbs = parser.add_subparsers(
        dest="room", required=True, metavar="{data,simulate,emulate,eval,report,launch,trainer}"
    )
    data_cli.register(verbs)
    register_simulate(verbs)
    register_emulate(verbs)
    register_eval(verbs)
    report_cli.register(verbs)
    launch_cli.register(verbs)
    trainer_cli.register(verbs)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ChemFLError as error:
        print(f"chemfl: error: {error}", file=sys.stderr)
        return 2


def register_simulate(verbs: argparse._SubParsersAction) -> None:
    simulate = verbs.add_parser(
        "simulate",
        help="run a recipe on Flower's simulation engine with a private, managed SuperLink",
        description="flwr run . --run-config RECIPE --stream, with its own Flower home under .flwr/, "
        "one SuperNode per facility, fresh ports, and the SuperLink stopped at the end.",
    )
    simulate.add_argument("recipe", type=Path, help="e.g. recipes/laptop.toml")
    simulate.add_argument("--app", type=Path, default=Path("."), help="the Flower App folder (default: .)")
    simulate.add_argument("--supernodes", type=int, default=None, help="default: one per facility in the recipe")
    simulate.add_argument(
        "--cpus-per-client",
        type=int,
        default=2,
        help="CPU cores per simulated ClientApp (default 2: one at a time on a 2-core laptop)",
    )
    simulate.add_argument(
        "--clients-at-once",
        type=int,
        default=None,
        help="run this many ClientApps at once whatever the core count (e.g. 4 with "
        "--cpus-per-client 1, so an emulated slow facility does not hold up the others)",
    )
    add_recipe_overrides(simulate, example="strategy.name=fedbuff")
    simulate.set_defaults(handler=run_simulate)


def add_recipe_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help=f"override one knob of the recipe, e.g. --set {example} (repeatable)",
    )


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The --set overrides of an existing recipe file (args.recipe)."""
    from chemfl.simulation import parse_overrides

    if not args.recipe.is_file():
        raise ChemFLError(f"recipe {args.recipe} does not exist")
    return parse_overrides(args.overrides)


def run_simulate(args: argparse.Namespace) -> int:
    from chemfl.checks import check_recipe
    from chemfl.simulation import simulate

    overrides = recipe_overrides(args)
    if not (args.app / "pyproject.toml").is_file():
        raise ChemFLError(f"{args.app} is not a Flower App folder (no pyproject.toml); pass --app")
    check_recipe(args.recipe, overrides)
    result = simulate(
        args.recipe,
        args.app,
        Path.cwd(),
        args.supernodes,
        args.cpus_per_client,
        args.clients_at_once,
        overrides=overrides,
    )
    if result.returncode != 0:
        print(f"chemfl: error: the run did not complete ({result.status}) {result.details}".rstrip(), file=sys.stderr)
    return result.returncode


def register_emulate(verbs: argparse._SubParsersAction) -> None:
    emulate = verbs.add_parser(
        "emulate",
        help="run an emulated campaign in seconds on the surrogate objective (no model, no Flower network)",
        description="The recipe's virtual-time campaign (emulation.virtual-time = true) with its strategy, "
        "run loop, batch jobs and queue waits, where each task trains a per-facility quadratic surrogate "
        "instead of the model (chemfl.emulation.surrogate). Writes outputs/<run-name>/ as chemfl simulate "
        "does, so chemfl report reads it.",
    )
    emulate.add_argument("recipe", type=Path, help="e.g. recipes/four-facilities-spikes.toml")
    add_recipe_overrides(emulate, example="strategy.name=fedqueue")
    emulate.set_defaults(handler=run_emulate)


def run_emulate(args: argparse.Namespace) -> int:
    from chemfl.data_prep.cli import load_run_config
    from chemfl.emulation.surrogate import run_surrogate_campaign

    overrides = recipe_overrides(args)
    config = resolve({**load_run_config(str(args.recipe)), **overrides})
    folder = run_surrogate_campaign(config)
    print(f"chemfl: campaign written to {folder}; draw it with chemfl report {folder}")
    return 0


def register_eval(verbs: argparse._SubParsersAction) -> None:
    evaluate = verbs.add_parser(
        "eval",
        help="evaluate a saved adapter (loaded with plain peft) on a build's test set",
    )
    evaluate.add_argument("adapter", type=Path, help="e.g. outputs/laptop/adapter")
    evaluate.add_argument("--run-config", metavar="TOML", help="the recipe the adapter was trained with")
    evaluate.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from chemfl.data_prep.cli import load_run_config
    from chemfl.llm.reload import evaluate_saved_adapter

    result = evaluate_saved_adapter(args.adapter, resolve(load_run_config(args.run_config)))
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
