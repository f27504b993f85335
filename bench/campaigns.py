"""Every strategy on both emulated four-facility campaigns, with the same seeds: the table of ratios.

    python bench/campaigns.py [--target-loss 3.8] [--hours 24] [--campaigns emulated,spikes]
                              [--strategies fedavg,fedasync,fedbuff,walltime-aware] [--seed 0] [--reuse]
                              [--queue-ahead]

Each run is `chemfl simulate recipes/four-facilities-<campaign>.toml` with strategy.name set,
stopping at the target test loss or after `--hours` virtual hours. Time is virtual (the campaign's
batch jobs, queue waits and walltimes), so the figures do not depend on this machine's speed.
Reported per campaign and strategy: virtual hours to the target, as a ratio to the best of
fedavg / fedasync / fedbuff and to fedavg, node-hours spent until then, the share of them wasted
(idle in a running job, or lost at a walltime end), updates lost at walltime ends, and versions.
Run folders land in outputs/bench-<campaign>-<strategy>; `chemfl report` draws them. With
--queue-ahead every facility submits its next job when the current one starts (emulation.queue-ahead);
those runs land in outputs/bench-<campaign>-<strategy>-queue-ahead.

A seed's run is the same line for line on one machine (tests/emulation/test_reproducible.py): only
the real-time fields of metrics.jsonl (server_seconds, evaluation_seconds, eval.seconds) and the
"real min" column change from run to run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from chemfl.report.runs import read_run, summarize
from chemfl.simulation import simulate

PROJECT = Path(__file__).resolve().parents[1]
BASELINES = ("fedavg", "fedasync", "fedbuff")


def run_one(
    campaign: str,
    strategy: str,
    target: float,
    hours: float,
    seed: int,
    reuse: bool,
    workdir: Path,
    queue_ahead: bool = False,
) -> tuple[Path, float]:
    name = f"bench-{campaign}-{strategy}" + ("-queue-ahead" if queue_ahead else "")
    finished = workdir / "outputs" / name / "metrics.jsonl"
    if reuse and finished.is_file() and "campaign end" in finished.read_text():
        return workdir / "outputs" / name, float("nan")
    overrides = {
        "strategy.name": strategy,
        "run-name": name,
        "strategy.target-loss": target,
        "strategy.max-seconds": hours * 3600.0,
        "emulation.seed": seed,
        "emulation.queue-ahead": queue_ahead,
    }
    started = time.perf_counter()
    # One core per ClientApp: two train at once on a 2-core laptop; virtual time makes it irrelevant.
    result = simulate(
        PROJECT / "recipes" / f"four-facilities-{campaign}.toml",
        PROJECT,
        workdir,
        cpus_per_client=1,
        capture=True,
        overrides=overrides,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return workdir / "outputs" / name, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target-loss", type=float, default=3.8)
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--campaigns", default="emulated,spikes")
    parser.add_argument("--strategies", default="fedavg,fedasync,fedbuff,fedcompass,fedqueue,walltime-aware")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="read finished run folders again instead of rerunning")
    parser.add_argument(
        "--queue-ahead",
        action="store_true",
        help="each facility submits its next job when the current one starts (emulation.queue-ahead = true)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=PROJECT,
        help="where runs start (data/, .cache/, outputs/ relative to it); one per bench running at once",
    )
    args = parser.parse_args()
    table = Table(
        title=f"Time to test loss {args.target_loss} on emulated four-facility campaigns "
        f"(seed {args.seed}, at most {args.hours:g} virtual hours"
        + (", jobs queued ahead)" if args.queue_ahead else ")")
    )
    for column in (
        "campaign",
        "strategy",
        "h to target",
        "x best baseline",
        "x fedavg",
        "node-h spent",
        "wasted",
        "lost at walltime",
        "versions",
        "final loss",
        "real min",
    ):
        table.add_column(column, justify="left" if column in ("campaign", "strategy") else "right")
    for campaign in args.campaigns.split(","):
        rows = {}
        for strategy in args.strategies.split(","):
            folder, seconds = run_one(
                campaign,
                strategy,
                args.target_loss,
                args.hours,
                args.seed,
                args.reuse,
                args.workdir,
                args.queue_ahead,
            )
            rows[strategy] = (summarize(read_run(folder), args.target_loss), seconds)
        reached = {s: summary.time_to_target for s, (summary, _) in rows.items()}
        baseline_times = [reached[s] for s in BASELINES if reached.get(s) is not None]
        best = min(baseline_times) if baseline_times else None
        for strategy, (summary, seconds) in rows.items():
            hours = reached[strategy]
            hours_text = f"{hours / 3600:.2f}" if hours is not None else f"> {args.hours:g}"

            def ratio(reference: float | None, hours: float | None = hours) -> str:
                return f"{hours / reference:.2f}" if hours is not None and reference else "-"

            spent = summary.total.node_hours
            table.add_row(
                campaign,
                strategy,
                hours_text,
                ratio(best),
                ratio(reached.get("fedavg")),
                f"{spent.spent:.1f}" if spent else "-",
                f"{spent.wasted_share:.1%}" if spent and spent.wasted_share is not None else "-",
                str(summary.total.tally.lost_at_walltime),
                str(summary.run.versions),
                f"{summary.final_loss:.3f}" if summary.final_loss is not None else "-",
                f"{seconds / 60:.1f}",
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
