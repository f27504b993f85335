"""`chemfl report RUN [RUN ...]`: figures and a markdown summary comparing finished runs."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from chemfl.errors import ChemFLError

SUMMARY = "summary.md"


def register(verbs: argparse._SubParsersAction) -> None:
    report = verbs.add_parser(
        "report",
        help="plot and tabulate finished runs: test loss, facility timelines, updates, node-hours, per-task scores",
        description="Reads run folders (outputs/<run-name>/: config.json, metrics.jsonl) and writes loss.png, "
        "timeline.png (runs with batch-job lines), updates.png, quality.png (runs whose evaluations have per-task "
        "metrics, baselines included) and summary.md to a new report folder.",
    )
    # nargs="*" so that no runs at all gets ChemFLError's message rather than argparse's usage line.
    report.add_argument("runs", nargs="*", type=Path, metavar="RUN", help="run folders, e.g. outputs/bench-fedavg")
    report.add_argument("--out", type=Path, default=None, help="report folder (default: reports/<timestamp>)")
    report.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="LOSS",
        help="target test loss: drawn on loss.png, time to reach it in summary.md",
    )
    report.add_argument("--force", action="store_true", help="replace an existing report in --out")
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    out = write_report(args.runs, args.out or default_report_dir(), args.target, args.force)
    print(f"{out}: report of {len(args.runs)} run(s): " + ", ".join(sorted(path.name for path in out.iterdir())))
    return 0


def default_report_dir() -> Path:
    return Path("reports") / datetime.now().strftime("%Y%m%d-%H%M%S")


def write_report(run_folders: Sequence[Path], out: Path, target: float | None, force: bool = False) -> Path:
    """Reads the runs, draws the figures and writes summary.md into a staging folder, then renames
    it to `out`: an interrupted report never leaves a half-written folder behind."""
    # Imported here: matplotlib and the readers are not needed by the other `chemfl` commands.
    from chemfl.files import replace_dir, staging_dir
    from chemfl.report import plots
    from chemfl.report.runs import model_results, read_runs, run_labels, summarize, time_unit
    from chemfl.report.summary import render_summary

    runs = read_runs(run_folders)
    check_report_target(out, force)
    summaries = [summarize(run, target) for run in runs]
    labels = run_labels(runs)
    unit = time_unit(runs)  # one time unit for every figure and table
    staging = staging_dir(out)
    try:
        figures = [("loss.png", "Test loss against time, one line per run")]
        plots.plot_loss(runs, labels, target, unit, staging / "loss.png")
        timed = [(run, label) for run, label in zip(runs, labels, strict=False) if run.jobs]
        if timed:
            plots.plot_timeline(
                [run for run, _ in timed], [label for _, label in timed], unit, staging / "timeline.png"
            )
            figures.append(("timeline.png", "Batch jobs per facility: queued, training, idle, work lost"))
        plots.plot_updates(summaries, labels, staging / "updates.png")
        figures.append(("updates.png", "Accepted updates and mean staleness per facility"))
        models = model_results(runs, labels)
        if models:
            plots.plot_quality(models, staging / "quality.png")
            figures.append(("quality.png", "Test-set exact match per task, one bar per trained model"))
        untimed = [label for run, label in zip(runs, labels, strict=False) if not run.jobs]
        notes = (
            [
                f"No batch-job lines (plain simulation): {', '.join(untimed)}. The timeline and the node-hour "
                "columns cover only runs with job lines."
            ]
            if untimed
            else []
        )
        summary = render_summary(summaries, labels, target, unit, figures, notes, models)
        (staging / SUMMARY).write_text(summary, encoding="utf-8")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_report_target(out: Path, force: bool) -> None:
    """An existing report is replaced only with --force; anything else that exists, never (so a
    mistyped --out cannot delete a run or a data build)."""
    if not out.exists():
        return
    is_report = out.is_dir() and (out / SUMMARY).is_file()
    is_empty_dir = out.is_dir() and not any(out.iterdir())
    if not (is_report or is_empty_dir):
        raise ChemFLError(f"{out} exists and is not a report folder (no {SUMMARY}); choose another --out")
    if is_report and not force:
        raise ChemFLError(f"{out} already holds a report; pass --force to replace it, or choose another --out")
