"""fedavg vs fedasync vs fedbuff on the laptop recipe with one facility made 4x slower.

    python bench/strategies.py [--run-config recipes/laptop.toml] [--slow perlmutter=4] [--target-loss 1.0]

Each strategy runs through `chemfl simulate` (4 ClientApps at once, one core each:
with one ClientApp at a time, the slow facility's sleep would hold up every other facility
and no strategy could use the time) with the same client budget (3 rounds x 4 facilities
= 12 client updates), evaluation loss-only after every round / version (its time is subtracted
from the wall clock), and the slow facility sleeping 3x its training time after each task.
Reported, as ratios to fedavg in one run: wall-clock seconds to the target test loss, client
updates to the target, and the server's own time per update (serialising, aggregating,
checkpointing; evaluation excluded) as a share of local training time (target <= 2%).
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

from chemfl import protocol
from chemfl.config import resolve
from chemfl.simulation import simulate

PROJECT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "fedavg": {"strategy.name": "fedavg", "strategy.num-rounds": 3},
    "fedasync": {"strategy.name": "fedasync", "strategy.num-versions": 12},
    "fedbuff": {"strategy.name": "fedbuff", "strategy.num-versions": 4, "strategy.buffer-size": 3},
}


def run(name: str, base: dict, overrides: dict, clients_at_once: int) -> list[dict]:
    config = {**base, **overrides, "run-name": f"bench-{name}", "eval.every": 1, "eval.generate-per-task": 0}
    with tempfile.TemporaryDirectory() as scratch:
        recipe = Path(scratch) / "recipe.toml"
        recipe.write_text(tomli_w.dumps(config))
        completed = simulate(recipe, PROJECT, PROJECT, cpus_per_client=1, clients_at_once=clients_at_once, capture=True)
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    run_dir = PROJECT / str(resolve(config)["outputs.dir"]) / f"bench-{name}"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarise(data: list[dict], target: float) -> dict:
    """Seconds (evaluation time excluded) and client updates until the test loss <= target."""
    lines = [line for line in map(protocol.from_json, data) if line is not None]
    updates, train_seconds, evaluation, reached = 0, 0.0, 0.0, None
    server_total = 0.0
    for line in lines:
        if isinstance(line, protocol.UpdateLine) and line.accepted:
            updates += 1
            train_seconds += line.train_seconds or 0.0
        if isinstance(line, protocol.RoundLine):
            updates += len(line.facilities)
            train_seconds += line.node_train_seconds or 0.0
            evaluation += (line.eval or {}).get("seconds", 0.0)
            loss = (line.eval or {}).get("loss")
            server_total += line.server_seconds or 0.0
        elif isinstance(line, protocol.VersionLine):
            evaluation = line.evaluation_seconds
            loss = line.eval_loss
            server_total = line.server_seconds  # cumulative in version lines
        else:
            continue
        if loss is not None and loss <= target and reached is None:
            reached = {"seconds": line.wall_time - evaluation, "updates": updates}
    final = [line for line in lines if isinstance(line, protocol.RoundLine | protocol.VersionLine)][-1]
    final_loss = (final.eval or {}).get("loss") if isinstance(final, protocol.RoundLine) else final.eval_loss
    return {
        "reached": reached,
        "final_loss": final_loss,
        "updates": updates,
        "server_share": server_total / train_seconds if train_seconds else float("nan"),
        "server_per_update": server_total / max(updates, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="recipes/laptop.toml")
    parser.add_argument("--slow", default="perlmutter=4")
    parser.add_argument("--target-loss", type=float, default=1.0)
    parser.add_argument("--clients-at-once", type=int, default=4)
    args = parser.parse_args()
    base = {**parse_config_args([args.run_config]), "emulation.slowdown": args.slow, "eval.loss-per-task": 8}
    results = {
        name: summarise(run(name, base, overrides, args.clients_at_once), args.target_loss)
        for name, overrides in STRATEGIES.items()
    }
    table = Table(title=f"Strategies on {args.run_config}, {args.slow} slower, target test loss {args.target_loss}")
    for column in (
        "strategy",
        "s to target",
        "x fedavg",
        "updates to target",
        "x fedavg",
        "final loss",
        "server s / update",
        "server / training",
    ):
        table.add_column(column, justify="right" if column != "strategy" else "left")
    reference = results["fedavg"]["reached"]
    for name, result in results.items():
        reached = result["reached"]
        if reached is None:
            cells = ["not reached", "", "", ""]
        else:
            cells = [
                f"{reached['seconds']:.0f}",
                f"{reached['seconds'] / reference['seconds']:.2f}" if reference else "",
                str(reached["updates"]),
                f"{reached['updates'] / reference['updates']:.2f}" if reference else "",
            ]
        table.add_row(
            name,
            *cells,
            f"{result['final_loss']:.3f}",
            f"{result['server_per_update']:.3f}",
            f"{result['server_share']:.2%}",
        )
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
