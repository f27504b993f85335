"""The campaign study: every strategy on the calm, spikes and replayed-trace campaigns, over seeds.

    python bench/campaigns.py [--campaigns calm,spikes,trace] [--seeds 0-4] [--reuse]
                              [--strategies fedavg,fedasync,fedbuff,fedcompass,fedqueue,walltime-aware,
                                            walltime-aware+queue-ahead]
                              [--objective surrogate|model] [--target-loss 2.1] [--hours 72]

Each cell is one emulated campaign (recipes/four-facilities-{emulated,spikes,trace}.toml) with
strategy.name set and emulation.seed = the seed, stopping at the target test loss or after --hours
virtual hours. `NAME+queue-ahead` runs strategy NAME with emulation.queue-ahead = true (each
facility's next job is queued while the current one runs); every other cell resubmits at a job's
end. Time is virtual, so the figures do not depend on this machine.

--objective surrogate (default): `chemfl emulate`, the per-facility quadratic surrogate of
chemfl.emulation.surrogate, about a second per cell: the whole study (7 strategies x 3 campaigns
x 5 seeds) runs in minutes. --objective model: `chemfl simulate`, real training of the recipe's
tiny model (minutes to an hour per cell): the check of the surrogate's ranking on one seed.

Per campaign and strategy, over the seeds: virtual hours to the target (mean +- sd; ">" when a
seed did not get there, counted at the horizon), node-hours spent until then, the share wasted
(idle in a running job or lost at a walltime end), updates lost at walltime ends, and two paired
ratios of time to target (mean over seeds, and how many seeds are below 0.7): to the best
baseline of the campaign (fedavg, fedasync, fedbuff, fedcompass, fedqueue; lowest mean time) and
to the better of FedCompass and FedQueue on each seed. Run folders land in
outputs/bench-campaigns-<objective>/<campaign>-<strategy>-s<seed>; `chemfl report` draws them.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chemfl.config import resolve
from chemfl.data_prep.cli import load_run_config
from chemfl.emulation.surrogate import run_surrogate_campaign
from chemfl.report.runs import read_run, summarize
from chemfl.simulation import simulate

PROJECT = Path(__file__).resolve().parents[1]
RECIPES = {
    "calm": "four-facilities-emulated.toml",
    "spikes": "four-facilities-spikes.toml",
    "trace": "four-facilities-trace.toml",
}
BASELINES = ("fedavg", "fedasync", "fedbuff", "fedcompass", "fedqueue")
STRONGEST = ("fedcompass", "fedqueue")
QUEUE_AHEAD = "+queue-ahead"
STRATEGIES = (*BASELINES, "walltime-aware", "walltime-aware" + QUEUE_AHEAD)
DEFAULT_TARGET = {"surrogate": 2.1, "model": 3.3}


@dataclass(frozen=True)
class Cell:
    campaign: str
    strategy: str  # NAME or NAME+queue-ahead
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.campaign}-{self.strategy}-s{self.seed}"

    def overrides(self, target: float, hours: float, outputs: Path) -> dict:
        name = self.strategy.removesuffix(QUEUE_AHEAD)
        return {
            "strategy.name": name,
            "emulation.queue-ahead": self.strategy.endswith(QUEUE_AHEAD),
            "emulation.seed": self.seed,
            "strategy.target-loss": target,
            "strategy.max-seconds": hours * 3600.0,
            "run-name": self.run_name,
            "outputs.dir": str(outputs),
        }


@dataclass(frozen=True)
class Outcome:
    hours: float | None  # to the target; None: not reached within the horizon
    node_hours: float
    wasted_share: float
    lost_at_walltime: int
    versions: int


def run_cell(
    cell: Cell, objective: str, target: float, hours: float, reuse: bool, workdir: Path, model_eval_every: int
) -> Outcome:
    outputs = workdir / "outputs" / f"bench-campaigns-{objective}"
    folder = outputs / cell.run_name
    finished = folder / "metrics.jsonl"
    if not (reuse and finished.is_file() and "campaign end" in finished.read_text()):
        recipe = PROJECT / "recipes" / RECIPES[cell.campaign]
        overrides = cell.overrides(target, hours, outputs)
        if objective == "model":
            overrides["eval.every"] = model_eval_every
        if objective == "surrogate":
            run_surrogate_campaign(resolve({**load_run_config(str(recipe)), **overrides}))
        else:
            # One core per ClientApp: two train at once on a 2-core laptop; virtual time makes it irrelevant.
            result = simulate(recipe, PROJECT, workdir, cpus_per_client=1, capture=True, overrides=overrides)
            if result.returncode != 0:
                raise SystemExit(f"{cell.run_name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = summarize(read_run(folder), target)
    spent = summary.total.node_hours
    return Outcome(
        None if summary.time_to_target is None else summary.time_to_target / 3600,
        spent.spent if spent else math.nan,
        spent.wasted_share if spent and spent.wasted_share is not None else math.nan,
        summary.total.tally.lost_at_walltime,
        summary.run.versions,
    )


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def paired(times: dict[int, float], reference: dict[int, float]) -> str:
    """Mean over seeds of time / reference time, and on how many seeds it is below 0.7."""
    ratios = [times[seed] / reference[seed] for seed in times]
    return f"{statistics.mean(ratios):.2f} ({sum(r < 0.7 for r in ratios)}/{len(ratios)} < 0.7)"


def campaign_rows(outcomes: dict[tuple[str, int], Outcome], strategies: list[str], seeds: list[int], hours: float):
    """Table rows of one campaign; a seed that missed the target counts at the horizon."""
    times = {s: {seed: outcomes[s, seed].hours or hours for seed in seeds} for s in strategies}
    baselines = [s for s in strategies if s in BASELINES]
    best = min(baselines, key=lambda s: statistics.mean(times[s].values())) if baselines else None
    strongest = (
        {seed: min(times[s][seed] for s in STRONGEST) for seed in seeds} if set(STRONGEST) <= set(times) else None
    )
    for strategy in strategies:
        cells = [outcomes[strategy, seed] for seed in seeds]
        missed = sum(cell.hours is None for cell in cells)
        hours_text = ("> " if missed else "") + mean_sd(list(times[strategy].values()))
        yield [
            strategy,
            hours_text + (f" ({missed} missed)" if missed else ""),
            paired(times[strategy], times[best]) + (f" [{best}]" if strategy == best else "") if best else "-",
            paired(times[strategy], strongest) if strongest else "-",
            mean_sd([cell.node_hours for cell in cells]),
            f"{statistics.mean(cell.wasted_share for cell in cells):.1%}",
            f"{statistics.mean(cell.lost_at_walltime for cell in cells):.1f}",
            f"{statistics.mean(cell.versions for cell in cells):.0f}",
        ]


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(seed) for seed in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--campaigns", default=",".join(RECIPES))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0-4", help="e.g. 0-4 or 0,3")
    parser.add_argument("--objective", choices=("surrogate", "model"), default="surrogate")
    parser.add_argument("--target-loss", type=float, default=None, help="default: 2.1 surrogate, 3.3 model")
    parser.add_argument("--hours", type=float, default=72.0, help="virtual hours at most per cell")
    parser.add_argument("--reuse", action="store_true", help="read finished run folders again instead of rerunning")
    parser.add_argument(
        "--model-eval-every",
        type=int,
        default=4,
        help="--objective model: evaluate every k-th version (each evaluation is real inference)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=PROJECT,
        help="where runs start (data/, .cache/, outputs/ relative to it); one per bench running at once",
    )
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # a line per version and per lost task otherwise
    target = args.target_loss if args.target_loss is not None else DEFAULT_TARGET[args.objective]
    strategies, seeds = args.strategies.split(","), parse_seeds(args.seeds)
    unknown = [s for s in strategies if s.removesuffix(QUEUE_AHEAD) not in (*BASELINES, "walltime-aware")]
    unknown += [c for c in args.campaigns.split(",") if c not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown strategy or campaign: {', '.join(unknown)}")
    started = time.perf_counter()
    table = Table(
        title=f"Virtual hours to test loss {target} ({args.objective} objective, seeds {args.seeds}, "
        f"at most {args.hours:g} h; paired ratios: mean over seeds of time / reference time)"
    )
    for column in (
        "campaign",
        "strategy",
        "h to target",
        "x best baseline",
        "x best of fedcompass/fedqueue",
        "node-h spent",
        "wasted",
        "lost at walltime",
        "versions",
    ):
        table.add_column(column, justify="left" if column in ("campaign", "strategy") else "right")
    for campaign in args.campaigns.split(","):
        outcomes = {
            (strategy, seed): run_cell(
                Cell(campaign, strategy, seed),
                args.objective,
                target,
                args.hours,
                args.reuse,
                args.workdir,
                args.model_eval_every,
            )
            for strategy in strategies
            for seed in seeds
        }
        for row in campaign_rows(outcomes, strategies, seeds, args.hours):
            table.add_row(campaign, *row)
        table.add_section()
    Console(width=220).print(table)
    cells = len(strategies) * len(seeds) * len(args.campaigns.split(","))
    print(f"{cells} cells in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
