"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no global backend state).

Sized and styled for a paper: a fixed colour per strategy (colour-blind safe, Okabe-Ito), a
marker per strategy and a line style / hatch per run so that runs sharing a colour stay apart in
greyscale, axis labels with units, legends outside the axes, constrained layout, 200 dpi.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from chemfl.report.runs import (
    Interval,
    ModelResult,
    Run,
    RunSummary,
    TimeUnit,
    facility_order,
    facility_timeline,
    task_order,
    time_axis_name,
)

DPI = 200
WIDTH_INCHES = 7.0  # the full text width of a two-column paper, so fonts print at their set size
STRATEGY_COLOURS = {
    "fedavg": "#0072B2",
    "fedasync": "#E69F00",
    "fedbuff": "#009E73",
    "fedcompass": "#56B4E9",
    "fedqueue": "#F0E442",
    "centralized": "#000000",
    "local": "#D55E00",
}
OTHER_STRATEGY_COLOUR = "#CC79A7"
BASE_MODEL_COLOUR = "#999999"
STRATEGY_MARKERS = {
    "fedavg": "o",
    "fedasync": "s",
    "fedbuff": "^",
    "fedcompass": "<",
    "fedqueue": ">",
    "centralized": "v",
    "local": "P",
}
OTHER_STRATEGY_MARKER = "D"
LINE_STYLES = ("-", "--", ":", "-.")
HATCHES = ("", "//", "..", "xx")
STATE_COLOURS = {  # timeline states
    "queued": "#56B4E9",
    "running, training": "#009E73",
    "running, idle": "#D9D9D9",
    "work lost": "#D55E00",
}
PAPER_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass(frozen=True)
class RunStyle:
    colour: str
    marker: str
    linestyle: str
    hatch: str


def run_styles(runs: Sequence[Run]) -> list[RunStyle]:
    """The strategy's colour and marker; the n-th run drawn in a colour gets the n-th line style and hatch."""
    styles, seen = [], {}
    for run in runs:
        colour = STRATEGY_COLOURS.get(run.strategy, OTHER_STRATEGY_COLOUR)
        nth = seen.get(colour, 0)
        seen[colour] = nth + 1
        styles.append(
            RunStyle(
                colour,
                STRATEGY_MARKERS.get(run.strategy, OTHER_STRATEGY_MARKER),
                LINE_STYLES[nth % len(LINE_STYLES)],
                HATCHES[nth % len(HATCHES)],
            )
        )
    return styles


def new_figure(height_inches: float) -> Figure:
    figure = Figure(figsize=(WIDTH_INCHES, height_inches), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, format="png")


def time_label(runs: Sequence[Run], unit: TimeUnit) -> str:
    return f"{time_axis_name(runs)} since the run started ({unit.name})"


# --- loss.png -------------------------------------------------------------------------------------


def plot_loss(runs: Sequence[Run], labels: Sequence[str], target: float | None, unit: TimeUnit, path: Path) -> None:
    """Test loss at each centralized evaluation against time, one line per run."""
    with matplotlib.rc_context(PAPER_STYLE):
        figure = new_figure(3.4)
        axes = figure.add_subplot()
        for run, label, style in zip(runs, labels, run_styles(runs), strict=False):
            if run.evaluations:
                axes.plot(
                    [unit.of(e.time) for e in run.evaluations],
                    [e.loss for e in run.evaluations],
                    color=style.colour,
                    linestyle=style.linestyle,
                    marker=style.marker,
                    markersize=4,
                    linewidth=1.5,
                    label=label,
                )
        if target is not None:
            axes.axhline(target, color="0.35", linestyle=(0, (4, 2)), linewidth=1, label=f"target loss {target:g}")
        if not any(run.evaluations for run in runs):
            axes.text(0.5, 0.5, "no evaluations recorded", transform=axes.transAxes, ha="center", va="center")
        axes.set_xlim(left=0)
        axes.set_xlabel(time_label(runs, unit))
        axes.set_ylabel("test loss per answer token")
        axes.set_title("Test loss of the global adapter")
        axes.grid(alpha=0.3, linewidth=0.5)
        if axes.get_legend_handles_labels()[0]:
            figure.legend(loc="outside right upper", frameon=False)
        save(figure, path)


# --- timeline.png ---------------------------------------------------------------------------------


def plot_timeline(runs: Sequence[Run], labels: Sequence[str], unit: TimeUnit, path: Path) -> None:
    """Per run (runs with job lines only), one row per facility: a thin upper band while a job
    waits in the queue, a wide lower band while jobs run, coloured by what the nodes did."""
    rows = [timeline_facilities(run) for run in runs]
    with matplotlib.rc_context(PAPER_STYLE):
        figure = new_figure(0.9 + sum(0.5 + 0.38 * len(facilities) for facilities in rows))
        grid = figure.subplots(
            len(runs), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": [max(1, len(f)) for f in rows]}
        )
        for axes, run, label, facilities in zip(grid[:, 0], runs, labels, rows, strict=False):
            draw_facility_rows(axes, run, facilities, unit)
            campaign = f", campaign {run.campaign}" if run.campaign else ""
            axes.set_title(f"{label}{campaign}", loc="left")
        grid[-1, 0].set_xlabel(time_label(runs, unit))
        grid[-1, 0].set_xlim(left=0)
        figure.suptitle("Batch jobs and training per facility")
        figure.legend(
            handles=[Patch(facecolor=colour, label=state) for state, colour in STATE_COLOURS.items()],
            loc="outside lower center",
            ncol=len(STATE_COLOURS),
            frameon=False,
        )
        save(figure, path)


def timeline_facilities(run: Run) -> list[str]:
    """Facilities that had a job, an update or lost work with known times."""
    return [facility for facility in run.facilities if not facility_timeline(run, facility).empty]


def draw_facility_rows(axes: Axes, run: Run, facilities: Sequence[str], unit: TimeUnit) -> None:
    def bars(intervals: Sequence[Interval], row: int, band: tuple[float, float], state: str) -> None:
        axes.broken_barh(
            [(unit.of(i.start), unit.of(i.seconds)) for i in intervals],
            (row + band[0], band[1]),
            facecolors=STATE_COLOURS[state],
            linewidth=0,
        )

    queue_band, run_band = (-0.42, 0.22), (-0.16, 0.56)  # row centre at 0; y grows downwards
    for row, facility in enumerate(facilities):
        timeline = facility_timeline(run, facility)
        bars(timeline.queued, row, queue_band, "queued")
        # Idle first, for the whole running span: training and lost work are drawn over it.
        bars(timeline.running, row, run_band, "running, idle")
        bars(timeline.busy, row, run_band, "running, training")
        bars(timeline.lost, row, run_band, "work lost")
    axes.set_yticks(range(len(facilities)), facilities)
    axes.set_ylim(len(facilities) - 0.5, -0.5)
    axes.tick_params(axis="y", length=0)
    axes.grid(axis="x", alpha=0.3, linewidth=0.5)


# --- updates.png ----------------------------------------------------------------------------------


def plot_updates(summaries: Sequence[RunSummary], labels: Sequence[str], path: Path) -> None:
    """Accepted updates and mean staleness per facility, one bar per run in each group."""
    runs = [summary.run for summary in summaries]
    facilities = facility_order(*(run.facilities for run in runs))
    width = 0.8 / len(summaries)
    with matplotlib.rc_context(PAPER_STYLE):
        figure = new_figure(3.2)
        count_axes, staleness_axes = figure.subplots(1, 2)
        for index, (summary, label, style) in enumerate(zip(summaries, labels, run_styles(runs), strict=False)):
            tallies = {facility.facility: facility.tally for facility in summary.facilities}
            offsets = [k + (index - (len(summaries) - 1) / 2) * width for k in range(len(facilities))]
            counts = [tallies[f].accepted if f in tallies else 0 for f in facilities]
            staleness = [
                tallies[f].mean_staleness if f in tallies and tallies[f].mean_staleness is not None else math.nan
                for f in facilities
            ]
            look = {"color": style.colour, "hatch": style.hatch, "edgecolor": "white", "linewidth": 0.5}
            count_bars = count_axes.bar(offsets, counts, width, label=label, **look)
            count_axes.bar_label(count_bars, fmt="%d", fontsize=7, padding=1)
            staleness_bars = staleness_axes.bar(offsets, staleness, width, **look)
            staleness_axes.bar_label(
                staleness_bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in staleness], fontsize=7, padding=1
            )
        for axes, ylabel, title in (
            (count_axes, "accepted updates", "Accepted updates"),
            (staleness_axes, "mean staleness (server versions)", "Mean staleness of arrived updates"),
        ):
            axes.set_xticks(range(len(facilities)), facilities)
            axes.set_xlabel("facility")
            axes.set_ylabel(ylabel)
            axes.set_title(title)
            axes.margins(y=0.15)  # room for the bar labels
            axes.grid(axis="y", alpha=0.3, linewidth=0.5)
            axes.set_axisbelow(True)
        count_axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.legend(loc="outside lower center", ncol=min(len(summaries), 4), frameon=False)
        save(figure, path)


# --- quality.png ----------------------------------------------------------------------------------

MACRO = "macro mean"
QUALITY_COLUMNS = 3


def model_styles(results: Sequence[ModelResult]) -> list[tuple[str, str]]:
    """(colour, hatch) per model: its strategy's colour (grey for the base model); models sharing a
    colour (a local baseline's facilities, two runs of one strategy) get successive hatches."""
    styles, seen = [], {}
    for result in results:
        colour = STRATEGY_COLOURS.get(result.strategy, OTHER_STRATEGY_COLOUR) if result.strategy else BASE_MODEL_COLOUR
        nth = seen.get(colour, 0)
        seen[colour] = nth + 1
        styles.append((colour, HATCHES[nth % len(HATCHES)]))
    return styles


def plot_quality(results: Sequence[ModelResult], path: Path) -> None:
    """Test-set exact match of every trained model: one bar chart per task, and one of the macro mean."""
    panels = [*task_order(results), MACRO]
    rows = math.ceil(len(panels) / QUALITY_COLUMNS)
    styles = model_styles(results)
    with matplotlib.rc_context(PAPER_STYLE):
        figure = new_figure(0.9 + 1.9 * rows + 0.2 * math.ceil(len(results) / 3))
        grid = figure.subplots(rows, QUALITY_COLUMNS, sharey=True, squeeze=False)
        for axes, panel in zip(grid.flat, panels, strict=False):
            heights = [
                (result.scores.macro_exact_match if panel == MACRO else result.scores.exact_match.get(panel))
                for result in results
            ]
            heights = [math.nan if height is None else height for height in heights]
            for index, (result, height, (colour, hatch)) in enumerate(zip(results, heights, styles, strict=True)):
                bars = axes.bar(
                    index, height, 0.8, color=colour, hatch=hatch, edgecolor="white", linewidth=0.5, label=result.label
                )
                axes.bar_label(bars, labels=["–" if math.isnan(height) else f"{height:.2f}"], fontsize=6, padding=1)
            axes.set_title(panel, fontsize=8, fontweight="bold" if panel == MACRO else "normal")
            axes.set_xticks([])
            axes.set_ylim(0, 1.15)  # room for the bar labels above 1.0
            axes.grid(axis="y", alpha=0.3, linewidth=0.5)
            axes.set_axisbelow(True)
        for axes in grid[:, 0]:
            axes.set_ylabel("exact match")
        for axes in list(grid.flat)[len(panels) :]:
            axes.set_visible(False)
        figure.suptitle("Test-set exact match per task, one bar per trained model")
        handles, names = grid[0, 0].get_legend_handles_labels()
        figure.legend(handles, names, loc="outside lower center", ncol=min(len(results), 3), frameon=False)
        save(figure, path)
