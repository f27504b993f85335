"""Share of each federated round spent outside local training, on the laptop recipe.

    python bench/round_overhead.py [--run-config recipes/laptop.toml] [--rounds 3]

Runs the recipe through `chemfl simulate` (centralized evaluation trimmed to one record per task,
since evaluation is not part of a round) and reads outputs/<run>/metrics.jsonl: per round,
`round_seconds` (dispatch to aggregated, server side) against `node_train_seconds` (the nodes' own
training loops, summed; simulated ClientApps run one at a time on 2 cores, so the sum is the
round's training time). Target (training issue): <= 10% outside training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import tomli_w
from flwr.common.config import parse_config_args
from rich.console import Console
from rich.table import Table

from chemfl.config import resolve
from chemfl.simulation import simulate

PROJECT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="recipes/laptop.toml")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = parse_config_args([args.run_config])
    config.update(
        {
            "run-name": "bench-round-overhead",
            "strategy.num-rounds": args.rounds,
            "eval.loss-per-task": 1,
            "eval.generate-per-task": 0,
        }
    )
    with tempfile.TemporaryDirectory() as scratch:
        recipe = Path(scratch) / "recipe.toml"
        recipe.write_text(tomli_w.dumps(config))
        completed = simulate(recipe, PROJECT, PROJECT, capture=True)
    if completed.returncode != 0:
        raise SystemExit(completed.stdout[-4000:] + completed.stderr[-4000:])
    run_dir = PROJECT / str(resolve(config)["outputs.dir"]) / "bench-round-overhead"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [line for line in lines if "round_seconds" in line]
    table = Table(title=f"Time outside local training per round ({args.run_config}, {len(rounds)} rounds)")
    for column in ("round", "round s", "node training s", "outside training s", "share outside"):
        table.add_column(column, justify="right")
    for line in rounds:
        outside = line["round_seconds"] - line["node_train_seconds"]
        table.add_row(
            str(line["round"]),
            f"{line['round_seconds']:.1f}",
            f"{line['node_train_seconds']:.1f}",
            f"{outside:.1f}",
            f"{outside / line['round_seconds']:.1%}",
        )
    total = sum(line["round_seconds"] for line in rounds)
    trained = sum(line["node_train_seconds"] for line in rounds)
    table.add_row(
        "[bold]all", f"{total:.1f}", f"{trained:.1f}", f"{total - trained:.1f}", f"{(total - trained) / total:.1%}"
    )
    steady = rounds[1:]
    if steady:
        total = sum(line["round_seconds"] for line in steady)
        trained = sum(line["node_train_seconds"] for line in steady)
        table.add_row(
            "[bold]after round 1",
            f"{total:.1f}",
            f"{trained:.1f}",
            f"{total - trained:.1f}",
            f"{(total - trained) / total:.1%}",
        )
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
