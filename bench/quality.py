"""Does joining pay? Test-set quality of every facility alone, FedAvg, FedBuff and centralized training,
with equal compute, on the by-task-groups data split by task group and split iid.

    python bench/quality.py [--quick] [--reuse] [--partitions by-task,iid] [--rounds 2] [--local-steps 8]
                            [--generate 6] [--loss-records 16]

Per partition, four cells, each one `chemfl simulate recipes/by-task-groups.toml` with --set overrides:
- fedavg: R rounds x the N facilities x S local steps (its round-0 evaluation is the base model's row);
- fedbuff: FedBuff with K = N updates per version and R versions (sqrt staleness, server-lr 1): the same
  R x N updates of S steps, as the asynchronous representative (bench/strategies.py: fedbuff and fedasync
  end close on equal budgets; fedbuff's exact K makes its compute equal to FedAvg's);
- centralized: every facility's training shard pooled, R x N x S steps (strategy.baseline-match = fedavg);
- local: each facility alone on its shard, R x N x S steps each.
So every trained model took R x N x S optimizer steps and drew R x N x S x batch examples: the table
prints both per row, read back from the run folders. Partitions: `by-task` is the recipe's split (polaris
the name conversions, aurora the properties, frontier the reactions); `iid` the same molecules and tasks
split iid (data.partition-scheme = "iid", its own build at data/by-task-groups-iid).

Scores: exact match on the first `--generate` test records of each task (greedy, LlaSMol's metrics), the
macro mean, and the test loss per answer token on the first `--loss-records` of each task. Checks printed
below the table: federated test loss <= 1.05 x centralized; every facility's local-only model worse than
the federated one on macro exact match and on the tasks it does not hold; tasks where federation also
helps a facility on its own tasks.

Cells are cached as run folders under outputs/bench-quality/ (outputs/bench-quality-quick/ with --quick);
--reuse reads a cell again when its folder holds a complete run of the same resolved config. `--quick`: a
smoke run of the whole machinery (the recipe's tokenizer on a tiny random network, 400 molecules, one
round of 2 steps, one generation per task); its scores mean nothing. `chemfl report <cell folders>`
draws the per-task bar chart.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.common.config import parse_config_args
from rich.console import Console
from rich.table import Table

from chemfl.config import resolve, split_list
from chemfl.report.runs import BASE_MODEL, ModelResult, model_results, read_run, task_order
from chemfl.simulation import simulate

PROJECT = Path(__file__).resolve().parents[1]
RECIPE = PROJECT / "recipes" / "by-task-groups.toml"
CELLS = ("fedavg", "fedbuff", "centralized", "local")
FEDERATED = ("fedavg", "fedbuff")
PARTITIONS = {
    "by-task": {},
    "iid": {"data.partition-scheme": "iid", "data.task-map": "", "data.path": "data/by-task-groups-iid"},
}
LOSS_MARGIN = 1.05  # federated test loss may exceed centralized by this factor
QUICK = {"model.tiny": True, "data.max-molecules": 400, "eval.max-new-tokens": 16}


@dataclass
class Cell:
    partition: str
    name: str
    folder: Path
    models: list[ModelResult]  # the base model first for fedavg
    seconds: float | None  # None: reused


def cell_overrides(partition: str, name: str, args: argparse.Namespace, facilities: int, outputs: Path) -> dict:
    overrides = {
        **PARTITIONS[partition],
        "run-name": f"{partition}-{name}",
        "outputs.dir": str(outputs),
        "strategy.name": name,
        "strategy.num-rounds": args.rounds,
        "strategy.min-nodes": facilities,
        "strategy.num-versions": args.rounds,
        "strategy.buffer-size": facilities,
        "strategy.baseline-match": "fedavg",
        "strategy.baseline-steps": 0,
        "train.local-steps": args.local_steps,
        "eval.every": 0,
        "eval.loss-per-task": args.loss_records,
        "eval.generate-per-task": args.generate,
    }
    if args.quick:
        overrides.update(QUICK, **{"data.path": f"data/bench-quality-quick-{partition}"})
    return overrides


def trained(models: list[ModelResult]) -> list[ModelResult]:
    """The trained models of a cell (FedAvg, FedBuff and centralized also evaluate the base model)."""
    return [model for model in models if model.label != BASE_MODEL]


def complete(name: str, models: list[ModelResult], rounds: int, facilities: int) -> bool:
    """The run reached its last evaluation: the final round / version, or every baseline model."""
    trained_models = trained(models)
    if name in FEDERATED:
        return len(trained_models) == 1 and trained_models[0].scores.version == rounds
    return len(trained_models) == (1 if name == "centralized" else facilities)


def run_cell(partition: str, name: str, args: argparse.Namespace, recipe: dict, outputs: Path) -> Cell:
    facilities = len(split_list(str(recipe["data.facilities"])))
    overrides = cell_overrides(partition, name, args, facilities, outputs)
    folder = outputs / str(overrides["run-name"])
    config = resolve({**recipe, **overrides})

    def finished() -> list[ModelResult] | None:
        if not (folder / "config.json").is_file() or json.loads((folder / "config.json").read_text()) != config:
            return None
        models = model_results([read_run(folder)], [name])
        return models if complete(name, models, args.rounds, facilities) else None

    if args.reuse and (models := finished()) is not None:
        return Cell(partition, name, folder, models, None)
    started = time.perf_counter()
    result = simulate(RECIPE, PROJECT, PROJECT, cpus_per_client=2, capture=True, overrides=overrides)
    if result.returncode != 0:
        raise SystemExit(f"{partition}-{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    models = finished()
    if models is None:
        raise SystemExit(f"{folder} holds no complete {name} run; see its metrics.jsonl")
    seconds = time.perf_counter() - started
    print(f"{partition}-{name}: {seconds / 60:.1f} min", flush=True)
    return Cell(partition, name, folder, models, seconds)


def build_tasks(data_path: Path) -> tuple[list[str], dict[str, set[str]]]:
    """The build's tasks in the recipe's order, and facility -> the tasks its training shard holds."""
    manifest = json.loads((data_path / "manifest.json").read_text())
    partitions = manifest["counts"]["partitions"]
    held = {facility: {task for task, n in counts["train"].items() if n > 0} for facility, counts in partitions.items()}
    return list(manifest["tasks"]), held


def short(task: str) -> str:
    """name_conversion-i2s -> i2s, property_prediction-logp -> logp, forward_synthesis -> forward."""
    return task.rsplit("-", 1)[-1].split("_")[0]


def rows_of(cells: list[Cell]) -> list[tuple[str, ModelResult]]:
    """(cell, model) in table order: base, each local model, FedAvg, FedBuff, centralized."""
    by_name = {cell.name: cell for cell in cells}
    base = [model for model in by_name["fedavg"].models if model.label == BASE_MODEL]
    rows = [("base", model) for model in base]
    for name in ("local", *FEDERATED, "centralized"):
        rows += [(name, model) for model in trained(by_name[name].models)]
    return rows


def quality_table(partitions: dict[str, list[Cell]], tasks: list[str], held: dict[str, dict[str, set[str]]]) -> Table:
    table = Table(title="Test set per task: exact match (bold: a task the facility's shard holds), equal compute")
    for column in ("partition", "model", "steps", "examples", *map(short, tasks), "macro EM", "test loss"):
        table.add_column(column, justify="left" if column in ("partition", "model") else "right")
    for partition, cells in partitions.items():
        for kind, model in rows_of(cells):
            owned = held[partition].get(model.facilities[0], set()) if model.facilities else set()
            marked = owned if len(owned) < len(tasks) else set()  # iid: every facility holds every task
            scores = model.scores

            def cell(task: str, scores=scores, marked=marked) -> str:
                value = scores.exact_match.get(task)
                text = "-" if value is None else f"{value:.2f}"
                return f"[bold]{text}[/bold]" if task in marked else text

            label = model.label if kind != "base" else "base model (no training)"
            table.add_row(
                partition,
                label,
                "-" if model.steps is None else str(model.steps),
                "-" if model.examples is None else str(model.examples),
                *map(cell, tasks),
                "-" if scores.macro_exact_match is None else f"{scores.macro_exact_match:.3f}",
                f"{scores.loss:.3f}",
            )
        table.add_section()
    return table


def checks(partition: str, cells: list[Cell], tasks: list[str], held: dict[str, set[str]]) -> list[str]:
    """The issue's checks, one line each, with FedAvg and FedBuff each as "the federated model".
    Local-only vs federated: PASS when strictly worse on macro exact match and on every task the
    facility lacks; TIE when never better but equal somewhere (e.g. both 0.00 on a task neither
    learnt); FAIL when not worse on macro or better on a task it lacks."""
    by_name = {cell.name: cell for cell in cells}
    [centralized] = trained(by_name["centralized"].models)
    lines = []
    for name in FEDERATED:
        [federated] = trained(by_name[name].models)
        fed, central = federated.scores, centralized.scores
        verdict = "PASS" if fed.loss <= LOSS_MARGIN * central.loss else "FAIL"
        lines.append(
            f"{partition} {name}: test loss {fed.loss:.3f} <= {LOSS_MARGIN} x centralized {central.loss:.3f} "
            f"= {LOSS_MARGIN * central.loss:.3f}: {verdict}"
        )
        for local in trained(by_name["local"].models):
            facility, scores = local.facilities[0], local.scores
            own = held.get(facility, set())

            def em(result, task: str) -> float:
                return result.exact_match.get(task, 0.0)

            local_macro, fed_macro = scores.macro_exact_match or 0.0, fed.macro_exact_match or 0.0
            lacks = [task for task in tasks if task not in own]
            worse = [short(t) for t in lacks if em(scores, t) < em(fed, t)]
            tied = [short(t) for t in lacks if em(scores, t) == em(fed, t)]
            better = [short(t) for t in lacks if em(scores, t) > em(fed, t)]
            if local_macro >= fed_macro or better:
                verdict = "FAIL"
            else:
                verdict = "TIE" if tied else "PASS"
            detail = f"macro {local_macro:.3f} vs {fed_macro:.3f}"
            if lacks:
                detail += (
                    f"; on the {len(lacks)} tasks it lacks: worse on {', '.join(worse) or 'none'}, "
                    f"tied on {', '.join(tied) or 'none'}, better on {', '.join(better) or 'none'}"
                )
            else:
                detail += " (it holds every task)"
            lines.append(f"{partition} local-only {facility} worse than {name}: {detail}: {verdict}")
            helped = [
                f"{short(t)} {em(fed, t):.2f} > {em(scores, t):.2f}"
                for t in tasks
                if t in own and em(fed, t) > em(scores, t)
            ]
            lines.append(f"{partition} {name} also helps {facility} on its own tasks: {'; '.join(helped) or 'none'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", default="by-task,iid")
    parser.add_argument("--rounds", type=int, default=2, help="FedAvg rounds = FedBuff versions (default 2)")
    parser.add_argument("--local-steps", type=int, default=8, help="train.local-steps (default 8)")
    parser.add_argument("--generate", type=int, default=6, help="eval.generate-per-task (default 6)")
    parser.add_argument("--loss-records", type=int, default=16, help="eval.loss-per-task (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random network, 1 round of 2 steps")
    parser.add_argument("--reuse", action="store_true", help="read finished cells again instead of rerunning")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.local_steps, args.generate, args.loss_records = 1, 2, 1, 2
    outputs = PROJECT / "outputs" / ("bench-quality-quick" if args.quick else "bench-quality")
    recipe = parse_config_args([str(RECIPE)])
    started = time.perf_counter()
    partitions: dict[str, list[Cell]] = {}
    held: dict[str, dict[str, set[str]]] = {}
    tasks: list[str] = []
    for partition in args.partitions.split(","):
        if partition not in PARTITIONS:
            raise SystemExit(f"unknown partition {partition!r}; use {', '.join(PARTITIONS)}")
        partitions[partition] = [run_cell(partition, name, args, recipe, outputs) for name in CELLS]
        config = json.loads((partitions[partition][0].folder / "config.json").read_text())
        built, held[partition] = build_tasks(PROJECT / str(config["data.path"]))
        scored = task_order([model for cell in partitions[partition] for model in cell.models])
        tasks += [task for task in built if task in scored and task not in tasks]
    console = Console(width=220)
    console.print(quality_table(partitions, tasks, held))
    for partition, cells in partitions.items():
        for line in checks(partition, cells, tasks, held[partition]):
            console.print(line, highlight=False)
    every = [cell for cells in partitions.values() for cell in cells]
    timed = [f"{c.partition}-{c.name} " + ("reused" if c.seconds is None else f"{c.seconds / 60:.1f}") for c in every]
    console.print(f"minutes per cell: {', '.join(timed)}; total {(time.perf_counter() - started) / 60:.1f} min")
    console.print(f"bar chart: chemfl report {' '.join(str(c.folder.relative_to(PROJECT)) for c in every)}")


if __name__ == "__main__":
    main()
