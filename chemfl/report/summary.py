"""summary.md: one row per run, one table of facilities per run, the definitions, the figures, and
the trained models' test-set scores per task."""

from __future__ import annotations

from collections.abc import Sequence

from chemfl.report.runs import (
    FacilitySummary,
    ModelResult,
    NodeHours,
    RunSummary,
    TimeUnit,
    task_order,
    time_axis_name,
)

MISSING = "–"
TALLY_COLUMNS = ("accepted", "rejected", "stale", "lost", "lost at walltime")

DEFINITIONS = """\
- **Times** are seconds since the run started: virtual seconds in emulated campaigns (the run line \
says `virtual_time`), wall-clock seconds otherwise.
- **Final test loss**: loss per answer token on the held-out test set at the last centralized evaluation.
- **Time to target**: time of the first evaluation whose test loss is at or below the target \
(evaluations are discrete, so the crossing happened at or before it).
- **Versions**: global versions the server published (rounds, for synchronous FedAvg runs).
- **Accepted / stale / rejected**: updates that reached the server and were aggregated / refused as too \
stale (`strategy.max-staleness`) / refused for any other reason (failed validation, a strategy's own rule). \
**Lost**: work sent to a node that never came back (node gone, error reply, walltime end); \
**lost at walltime**: those lost because the batch job's walltime ended first (reason `walltime...`). \
Synchronous FedAvg runs without update lines count one accepted update per facility per round.
- **Mean staleness**: mean, over every update that reached the server (accepted or refused), of the \
server versions published between its dispatch and its arrival (0 for synchronous FedAvg).
- **Node-hours spent**: sum over batch jobs of (end − start of running) × the job's nodes; a job still \
running when the log ends is counted up to the last logged time.
- **Busy node-hours**: sum over updates that reached the server (accepted or refused) of \
(arrival − dispatch) × nodes per SuperNode (nodes per job / SuperNodes per job, from the run line; one \
SuperNode per job where it does not say).
- **Lost node-hours**: sum over lost work of (loss time − dispatch) × nodes per SuperNode.
- **Idle node-hours** = spent − busy − lost: jobs running with no work in flight (waiting for the \
server, for a dispatch, or for the job's end).
- **Wasted share** = (idle + lost) / spent.
"""


def render_summary(
    summaries: Sequence[RunSummary],
    labels: Sequence[str],
    target: float | None,
    unit: TimeUnit,
    figures: Sequence[tuple[str, str]],
    notes: Sequence[str],
    models: Sequence[ModelResult] = (),
) -> str:
    """The whole summary.md; `figures` are (file name, caption) pairs, `notes` say what was skipped,
    `models` are the trained models compared on the test set (chemfl.report.runs.model_results)."""
    parts = ["# ChemFL run report", "", run_list(summaries, labels), ""]
    parts += [f"![{caption}]({name})  \n[{name}]({name}): {caption}\n" for name, caption in figures]
    parts += [f"> {note}\n" for note in notes]
    parts += ["## Runs", "", runs_table(summaries, labels, target, unit), "", "### Definitions", "", DEFINITIONS]
    if models:
        parts += ["## Test set per task", "", MODELS_NOTE, "", models_table(models), ""]
    parts += ["## Per facility", ""]
    for summary, label in zip(summaries, labels, strict=False):
        parts += [f"### {label}", "", facility_table(summary), ""]
    return "\n".join(parts)


MODELS_NOTE = (
    "Each trained model at its last evaluation: exact match per task on the generated test records, their macro "
    "mean, and the test loss per answer token. **Steps**: optimizer steps that went into the model (a federated "
    "run's: every aggregated update's, summed); **examples**: the examples they drew (steps x batch x "
    "accumulation). Local baselines have one model per facility; the base model is a run's initial adapter "
    "(LoRA B = 0)."
)


def models_table(models: Sequence[ModelResult]) -> str:
    tasks = task_order(models)
    header = ["model", "steps", "examples", "test loss", *tasks, "macro exact match"]
    rows = []
    for model in models:
        scores = model.scores
        rows.append(
            [
                model.label,
                MISSING if model.steps is None else str(model.steps),
                MISSING if model.examples is None else str(model.examples),
                number(scores.loss, 3),
                *(number(scores.exact_match.get(task), 2) for task in tasks),
                number(scores.macro_exact_match, 3),
            ]
        )
    return table(header, rows)


def run_list(summaries: Sequence[RunSummary], labels: Sequence[str]) -> str:
    lines = []
    for summary, label in zip(summaries, labels, strict=False):
        run = summary.run
        details = [f"campaign `{run.campaign}`"] if run.campaign else []
        details.append(time_axis_name([run]))
        details.append("job lines" if run.jobs else "no job lines")
        lines.append(f"- **{label}**: `{run.folder}` ({', '.join(details)})")
    return "\n".join(lines)


def runs_table(summaries: Sequence[RunSummary], labels: Sequence[str], target: float | None, unit: TimeUnit) -> str:
    header = ["strategy", "final test loss"]
    if target is not None:
        header.append(f"time to target {target:g} ({unit.name})")
    header += ["versions", *TALLY_COLUMNS, "node-hours spent", "busy node-hours", "wasted share"]
    rows = []
    for summary, label in zip(summaries, labels, strict=False):
        row = [label, number(summary.final_loss, 3)]
        if target is not None:
            row.append("not reached" if summary.time_to_target is None else time_value(summary.time_to_target, unit))
        row += [
            str(summary.run.versions),
            *tally_cells(summary.total),
            *node_hour_cells(summary.total.node_hours, ("spent", "busy", "wasted_share")),
        ]
        rows.append(row)
    return table(header, rows)


def tally_cells(summary: FacilitySummary) -> list[str]:
    tally = summary.tally
    return [str(tally.accepted), str(tally.rejected), str(tally.stale), str(tally.lost), str(tally.lost_at_walltime)]


def facility_table(summary: RunSummary) -> str:
    header = [
        "facility",
        *TALLY_COLUMNS,
        "mean staleness",
        "node-hours spent",
        "busy",
        "idle",
        "lost node-hours",
        "wasted share",
    ]
    rows = []
    for facility in [*summary.facilities, summary.total]:
        name = f"**{facility.facility}**" if facility is summary.total else facility.facility
        rows.append(
            [
                name,
                *tally_cells(facility),
                number(facility.tally.mean_staleness, 2),
                *node_hour_cells(facility.node_hours, ("spent", "busy", "idle", "lost", "wasted_share")),
            ]
        )
    return table(header, rows)


def node_hour_cells(hours: NodeHours | None, fields: Sequence[str]) -> list[str]:
    """`fields` of `hours` (node-hours to 2 decimals, wasted_share in %); dashes without job lines."""
    if hours is None:
        return [MISSING] * len(fields)
    return [share(hours.wasted_share) if name == "wasted_share" else number(getattr(hours, name), 2) for name in fields]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    alignment = ["---"] + ["---:"] * (len(header) - 1)  # the first column names a row, the rest are numbers
    return "\n".join([line(header), "|" + "|".join(alignment) + "|", *map(line, rows)])


def number(value: float | None, decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def share(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def time_value(seconds: float, unit: TimeUnit) -> str:
    return f"{unit.of(seconds):.2f}" if unit.name == "h" else f"{unit.of(seconds):.0f}"
