"""Split the training pool across facilities: iid, dirichlet over tasks, by-task, or relative sizes.

Partitioning itself is done by flwr-datasets partitioners on a two-column view (task, row); this
module turns ChemFL's facility-level options into their arguments and checks the result.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    SizePartitioner,
)

from chemfl.errors import ChemFLError

SCHEMES = ("iid", "dirichlet", "by-task", "sizes")
FACILITY_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class PartitionSpec:
    scheme: str
    facilities: tuple[str, ...]
    seed: int
    alpha: float = 0.5
    sizes: tuple[float, ...] = ()
    task_map: Mapping[str, str] = field(default_factory=dict)

    def validate(self, tasks: Sequence[str]) -> None:
        """Everything checkable before any data is read."""
        if self.scheme not in SCHEMES:
            raise ChemFLError(f"unknown partition scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if not self.facilities:
            raise ChemFLError("data.facilities is empty; name at least one facility")
        for name in self.facilities:
            if not FACILITY_NAME.match(name):
                raise ChemFLError(
                    f"facility name {name!r} must be lower-case letters, digits, '-' or '_', "
                    "starting with a letter (it becomes a folder name)"
                )
        if len(set(self.facilities)) != len(self.facilities):
            raise ChemFLError(f"data.facilities names a facility twice: {list(self.facilities)}")
        if self.scheme == "dirichlet" and not self.alpha > 0:
            raise ChemFLError(
                f"data.dirichlet-alpha = {self.alpha} must be > 0 (small, e.g. 0.1: each facility "
                "holds few tasks; large, e.g. 100: close to iid)"
            )
        if self.scheme == "sizes":
            if len(self.sizes) != len(self.facilities):
                raise ChemFLError(
                    f"data.sizes gives {len(self.sizes)} shares for {len(self.facilities)} "
                    'facilities; give one positive share per facility, e.g. "4,2,1,1"'
                )
            if not all(share > 0 for share in self.sizes):
                raise ChemFLError(f"data.sizes {list(self.sizes)}: every share must be > 0")
        if self.scheme == "by-task":
            self._validate_task_map(tasks)

    def _validate_task_map(self, tasks: Sequence[str]) -> None:
        unknown_tasks = sorted(set(self.task_map) - set(tasks))
        if unknown_tasks:
            raise ChemFLError(f"data.task-map names task(s) not being built: {unknown_tasks}")
        unmapped = sorted(set(tasks) - set(self.task_map))
        if unmapped:
            raise ChemFLError(
                f"data.task-map gives no facility for task(s) {unmapped}; map every task, "
                'e.g. "name_conversion-i2s=polaris,..."'
            )
        unknown_facilities = sorted(set(self.task_map.values()) - set(self.facilities))
        if unknown_facilities:
            raise ChemFLError(f"data.task-map names facilities not in data.facilities: {unknown_facilities}")
        idle = [name for name in self.facilities if name not in set(self.task_map.values())]
        if idle:
            raise ChemFLError(
                f"data.task-map leaves facility(ies) {idle} with no task, so their partitions "
                "would be empty; map a task to each or drop them from data.facilities"
            )


def parse_task_map(text: str) -> dict[str, str]:
    """'task=facility,task=facility' -> {task: facility}."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        task, sep, facility = item.partition("=")
        if not sep or not task.strip() or not facility.strip():
            raise ChemFLError(f"data.task-map entry {item!r} is not 'task=facility'")
        mapping[task.strip()] = facility.strip()
    return mapping


def shares_to_counts(shares: Sequence[float], total: int) -> list[int]:
    """Integer counts proportional to `shares` that add up to `total` (largest remainder)."""
    exact = [share / sum(shares) * total for share in shares]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def partition_indices(tasks_of_rows: Sequence[str], spec: PartitionSpec) -> list[list[int]]:
    """Row indices per facility (in spec.facilities order); every row lands in exactly one."""
    n_facilities = len(spec.facilities)
    if len(tasks_of_rows) < n_facilities:
        raise ChemFLError(
            f"{len(tasks_of_rows)} training examples cannot fill {n_facilities} partitions; "
            "build from more data or name fewer facilities"
        )
    view = datasets.Dataset.from_dict({"task": list(tasks_of_rows), "row": range(len(tasks_of_rows))})
    partitioner: Partitioner
    order = list(range(n_facilities))
    if spec.scheme == "iid":
        view = view.shuffle(seed=spec.seed)
        partitioner = IidPartitioner(num_partitions=n_facilities)
    elif spec.scheme == "sizes":
        view = view.shuffle(seed=spec.seed)
        counts = shares_to_counts(spec.sizes, len(view))
        if 0 in counts:
            raise ChemFLError(
                f"data.sizes {list(spec.sizes)} over {len(view)} examples leaves a facility with "
                "none; use less extreme shares or more data"
            )
        partitioner = SizePartitioner(partition_sizes=counts)
    elif spec.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=n_facilities,
            partition_by="task",
            alpha=spec.alpha,
            min_partition_size=1,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    else:  # by-task
        view = view.add_column("facility", [spec.task_map[task] for task in tasks_of_rows])
        partitioner = NaturalIdPartitioner(partition_by="facility")
    partitioner.dataset = view
    if spec.scheme == "by-task":
        _quietly(lambda: partitioner.num_partitions)  # makes flwr-datasets map ids to names
        by_name = {name: pid for pid, name in partitioner.partition_id_to_natural_id.items()}
        without_rows = [name for name in spec.facilities if name not in by_name]
        if without_rows:
            raise ChemFLError(
                f"data.task-map sends no task with examples to {without_rows}; their partitions would be empty"
            )
        order = [by_name[name] for name in spec.facilities]
    try:
        rows = [_quietly(lambda pid=pid: partitioner.load_partition(pid)["row"]) for pid in order]
    except ValueError as error:  # flwr-datasets gives up after its retries
        raise ChemFLError(
            f"the {spec.scheme} partitioner could not give every facility data ({error}); "
            "raise data.dirichlet-alpha or build from more data"
        ) from error
    empty = [name for name, part in zip(spec.facilities, rows, strict=False) if not part]
    if empty:
        raise ChemFLError(f"partition(s) for {empty} came out empty; use more data or fewer facilities")
    return rows


def _quietly(call):  # flwr-datasets warns and draws tqdm bars for routine steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()
