"""`chemfl data ...`: build a dataset, verify a build or shard, score trivial baselines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from chemfl.config import DEFAULTS, resolve
from chemfl.errors import ChemFLError

if TYPE_CHECKING:
    from rich.table import Table

DATA_KEYS = [key for key in DEFAULTS if key.startswith("data.") and key != "data.path"]


def register(verbs: argparse._SubParsersAction) -> None:
    data = verbs.add_parser("data", help="build, verify and score chemistry instruction data")
    actions = data.add_subparsers(dest="action", required=True)

    build = actions.add_parser(
        "build",
        help="build the dataset and one shard per facility",
        description="Build instruction data, split it by molecule, partition it across facilities. "
        "Defaults come from [tool.flwr.app.config]; --run-config reads a recipe; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("--run-config", metavar="TOML", help="a recipe, e.g. recipes/laptop.toml")
    build.add_argument("--out", help=f"output folder (default: data.path, {DEFAULTS['data.path']})")
    build.add_argument("--force", action="store_true", help="replace a different build in --out")
    for key in DATA_KEYS:
        flag = "--" + key.removeprefix("data.")
        kind = type(DEFAULTS[key])
        build.add_argument(flag, dest=key, type=kind, default=None, help=f"data knob {key} (default {DEFAULTS[key]!r})")
    build.set_defaults(handler=run_build)

    verify = actions.add_parser("verify", help="check a build or a facility shard against its manifest")
    verify.add_argument("path", type=Path)
    verify.set_defaults(handler=run_verify)

    floor = actions.add_parser("baselines", help="score two trivial baselines on a build's test set")
    floor.add_argument("path", type=Path)
    floor.set_defaults(handler=run_baselines)


def load_run_config(path: str | None) -> dict:
    if path is None:
        return {}
    from flwr.common.config import parse_config_args  # the parser `flwr run --run-config` uses

    if not Path(path).is_file():
        raise ChemFLError(f"run config {path} does not exist")
    return parse_config_args([path])


def run_build(args: argparse.Namespace) -> int:
    # Imported here, as in every handler below: `chemfl <anything> --help` must not load the data stack.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from chemfl.data_prep.build import BuildSpec, build_dataset

    overrides = load_run_config(args.run_config)
    overrides.update({key: getattr(args, key) for key in DATA_KEYS if getattr(args, key) is not None})
    config = resolve(overrides)
    spec = BuildSpec.from_config(config)
    out = Path(args.out or str(config["data.path"]))
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and CI: room for the summary table
        console.width = 120
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:

        def step(description: str, total: int):
            task_id = progress.add_task(description, total=total)
            return lambda: progress.advance(task_id)

        result = build_dataset(spec, out, force=args.force, step=step)
    console.print(summary_table(result.manifest))
    verb = "already built (verified)" if result.reused else f"built in {result.seconds:.1f} s"
    console.print(f"{out}: build {result.manifest['build_id']} {verb}")
    return 0


def summary_table(manifest: dict) -> Table:
    """Examples per task: the three splits, then each facility's training shard."""
    from rich.table import Table

    counts, facilities = manifest["counts"], manifest["facilities"]
    table = Table(
        title=f"{manifest['source']['name']} data: {manifest['scheme']} partition over "
        f"{len(facilities)} facilities, seed {manifest['seed']}, build {manifest['build_id']}",
        caption="facility columns: training examples in that facility's shard",
    )
    table.add_column("task", no_wrap=True)
    for column in ("train", "val", "test", *facilities):
        table.add_column(column, justify="right")
    rows = [(task, lambda c, t=task: c.get(t, 0)) for task in manifest["tasks"]]
    rows.append(("total", lambda c: sum(c.values())))
    for label, count in rows:
        splits = [count(counts[split]) for split in ("train", "validation", "test")]
        shards = [count(counts["partitions"][name]["train"]) for name in facilities]
        table.add_row(label, *map(str, splits + shards), end_section=label == manifest["tasks"][-1])
    return table


def run_verify(args: argparse.Namespace) -> int:
    from chemfl.data_prep.build import verify_build

    problems = verify_build(args.path)
    if problems:
        raise ChemFLError(f"{args.path} does not match its manifest: " + "; ".join(problems))
    print(f"{args.path}: every file matches its manifest")
    return 0


def run_baselines(args: argparse.Namespace) -> int:
    from rich.console import Console

    from chemfl.data_prep import baselines, store

    test_file = Path(args.path) / "test.parquet"
    if not test_file.is_file():
        raise ChemFLError(f"{args.path} has no test.parquet; point at a build folder")
    train = [
        r for shard in sorted(Path(args.path).glob("partitions/*/train.parquet")) for r in store.read_records(shard)
    ]
    Console().print(baselines.baseline_table(store.read_records(test_file), train))
    return 0
