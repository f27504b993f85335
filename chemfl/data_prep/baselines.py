"""Two trivial baselines that give model scores a floor: copy the input's core, or answer the
task's most common training output."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.table import Table

from chemfl.data_prep.metrics import score
from chemfl.data_prep.schema import tagged


def copy_input(records: Sequence[dict]) -> list[str]:
    return [tagged(r["raw_input"], r["output_core_tag_left"], r["output_core_tag_right"]) for r in records]


def most_common_output(records: Sequence[dict], train: Sequence[dict]) -> list[str]:
    """Each record answered with its task's most common raw output in `train` (ties: first seen)."""
    by_task: dict[str, Counter] = {}
    for record in train:
        by_task.setdefault(record["task"], Counter())[record["raw_output"]] += 1
    answers = {task: counts.most_common(1)[0][0] for task, counts in by_task.items()}
    return [tagged(answers.get(r["task"], ""), r["output_core_tag_left"], r["output_core_tag_right"]) for r in records]


def baseline_scores(test: Sequence[dict], train: Sequence[dict]) -> dict[str, dict]:
    return {
        "copy-input": score(test, copy_input(test)),
        "most-common": score(test, most_common_output(test, train)),
    }


def baseline_table(test: Sequence[dict], train: Sequence[dict]) -> Table:
    results = baseline_scores(test, train)
    table = Table(title=f"Trivial baselines on the test set ({len(test)} records): exact match")
    table.add_column("task")
    table.add_column("n", justify="right")
    for name in results:
        table.add_column(name, justify="right")
    tasks = results["copy-input"]["tasks"]
    for task, metrics in tasks.items():
        cells = []
        for result in results.values():
            task_metrics = result["tasks"][task]
            cell = f"{task_metrics['exact_match']:.3f}"
            if task_metrics.get("rmse") is not None:
                cell += f" (rmse {task_metrics['rmse']:.2f})"
            cells.append(cell)
        table.add_row(task, str(metrics["n"]), *cells)
    table.add_row("[bold]macro mean", "", *(f"{r['overall']['exact_match']:.3f}" for r in results.values()))
    return table
