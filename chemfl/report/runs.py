"""Run folders (config.json + metrics.jsonl) read into plain dataclasses, and every number the
report shows: evaluations, update tallies, per-facility intervals, node-hours, and each trained
model's test-set scores per task. Pure: no plotting.

Times are seconds since the run started: wall-clock in plain simulations, virtual in emulated
campaigns (the run line says `"virtual_time": true`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from chemfl import protocol
from chemfl.config import split_list
from chemfl.errors import ChemFLError

SECONDS_PER_HOUR = 3600.0
HOURS_AXIS_AFTER_SECONDS = 2 * SECONDS_PER_HOUR  # longer spans are shown in hours
UNKNOWN_FACILITY = "unknown"  # a node whose lines never name its facility
JOB_STATE_FIELDS = dict(zip(protocol.JobLine.STATES, ("queued", "started", "ended"), strict=True))  # -> Job field


@dataclass(frozen=True)
class Interval:
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Evaluation:
    time: float
    loss: float


@dataclass(frozen=True)
class Update:
    """One trained update that reached the server, used or not."""

    facility: str
    accepted: bool
    reason: str  # "" when accepted; "stale", "rejected: ..." or a strategy's own reason otherwise
    staleness: int
    arrival_time: float
    dispatch_time: float | None  # logged by emulated campaigns only
    steps: int | None = None  # local optimizer steps, where logged


@dataclass(frozen=True)
class LostWork:
    """Work sent to a node that never came back (node gone, error reply, walltime end)."""

    facility: str
    reason: str
    time: float
    dispatch_time: float | None


@dataclass(frozen=True)
class Scores:
    """A test-set evaluation that carries per-task metrics (the centralized evaluation's full result)."""

    adapter: str | None  # None: the run's global adapter; else one of several (local baselines: adapter-<facility>)
    version: int  # the round, version, or (baselines) 0 before / 1 after training
    time: float
    loss: float
    exact_match: dict[str, float]  # task -> exact match over its generated test records
    macro_exact_match: float | None  # mean over tasks


@dataclass(frozen=True)
class TrainedModel:
    """A model a baseline trained (its training line)."""

    adapter: str
    facilities: list[str]  # whose training shards
    steps: int
    examples: int


@dataclass
class Job:
    """One batch job; `ended` is filled in at the end of reading for jobs the log leaves open."""

    facility: str
    job: int
    nodes: int
    queued: float | None = None
    started: float | None = None  # None: it never ran
    ended: float | None = None


@dataclass(frozen=True)
class FacilityShape:
    """Nodes per batch job and SuperNodes per batch job (the run line's `facilities`)."""

    nodes: int = 1
    supernodes: int = 1

    @property
    def nodes_per_supernode(self) -> float:
        return self.nodes / self.supernodes


@dataclass
class Run:
    folder: Path
    strategy: str
    campaign: str  # "" outside emulated campaigns
    virtual_time: bool
    facilities: list[str]  # display order: the run line's, then data.facilities, then as met
    shapes: dict[str, FacilityShape]
    evaluations: list[Evaluation]  # in time order
    versions: int  # server versions published (FedAvg rounds for synchronous runs)
    updates: list[Update]
    lost: list[LostWork]
    jobs: list[Job]
    end_time: float  # the latest time any line mentions
    scores: list[Scores] = field(default_factory=list)  # in the order written
    trained: dict[str, TrainedModel] = field(default_factory=dict)  # baselines: adapter -> what it trained on
    steps: int = 0  # optimizer steps in the global adapter: the updates aggregated into it, summed
    examples_per_step: int | None = None  # train.batch-size x train.grad-accum, from config.json

    @property
    def name(self) -> str:
        return self.folder.name

    def shape(self, facility: str) -> FacilityShape:
        return self.shapes.get(facility, FacilityShape())


# --- reading ------------------------------------------------------------------------------------


def read_runs(folders: Sequence[Path]) -> list[Run]:
    if not folders:
        raise ChemFLError(
            "no run folders given; pass one or more, e.g. chemfl report outputs/bench-fedavg outputs/bench-fedbuff"
        )
    return [read_run(Path(folder)) for folder in folders]


def read_run(folder: Path) -> Run:
    metrics = folder / "metrics.jsonl"
    if not folder.is_dir():
        raise ChemFLError(f"{folder}: no such run folder")
    if not metrics.is_file():
        raise ChemFLError(f"{folder} has no metrics.jsonl; pass a run folder such as outputs/<run-name>")
    lines = read_lines(metrics)
    if not lines:
        raise ChemFLError(f"{metrics} is empty: the run recorded nothing (it stopped before its first evaluation?)")
    config = read_config(folder)
    reader = _MetricsReader()
    for number, line in lines:
        try:
            reader.add(line)
        except (KeyError, TypeError, ValueError) as error:
            raise ChemFLError(
                f"{metrics} line {number}: malformed {line.get('event', 'round')!r} line "
                f"({type(error).__name__}: {error})"
            ) from None
    reader.attribute_lost_work()
    strategy = str((reader.run_line.strategy if reader.run_line else "") or config.get("strategy.name") or "")
    if not strategy:
        raise ChemFLError(f"{folder}: cannot tell the strategy (no config.json with strategy.name, no run line)")
    run_facilities = reader.run_line.facilities if reader.run_line else {}
    end_time = max(reader.times, default=0.0)
    for job in reader.jobs.values():
        if job.ended is None:  # still queued or running when the log stops
            job.ended = end_time
    shapes = {
        name: FacilityShape(int(spec.get("nodes", 1)), int(spec.get("supernodes", 1)))
        for name, spec in run_facilities.items()
    }
    for job in reader.jobs.values():  # a facility the run line leaves out: one SuperNode per job
        shapes.setdefault(job.facility, FacilityShape(job.nodes, 1))
    configured = split_list(str(config.get("data.facilities", "")))
    return Run(
        folder=folder,
        strategy=strategy,
        campaign=reader.run_line.campaign if reader.run_line else "",
        virtual_time=bool(reader.run_line and reader.run_line.virtual_time),
        facilities=facility_order(run_facilities, configured, reader.facilities_met),
        shapes=shapes,
        evaluations=sorted(reader.evaluations, key=lambda e: e.time),
        versions=reader.versions,
        updates=reader.updates,
        lost=reader.lost,
        jobs=list(reader.jobs.values()),
        end_time=end_time,
        scores=reader.scores,
        trained=reader.trained,
        steps=reader.steps,
        examples_per_step=examples_per_step(config),
    )


def examples_per_step(config: dict) -> int | None:
    """Examples one optimizer step draws: train.batch-size x train.grad-accum (None without config.json)."""
    batch, accumulation = config.get("train.batch-size"), config.get("train.grad-accum", 1)
    return int(batch) * int(accumulation) if batch is not None else None


def read_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line."""
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ChemFLError(
                f"{path} line {number} is not JSON ({error.msg}); was the run killed mid-write?"
            ) from None
        if not isinstance(line, dict):
            raise ChemFLError(f"{path} line {number} is not a JSON object")
        lines.append((number, line))
    return lines


def read_config(folder: Path) -> dict:
    """The resolved run config, or {} without config.json (the run line can name the strategy)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ChemFLError(f"{path} is not JSON ({error.msg})") from None


def facility_order(*sources: Iterable[str]) -> list[str]:
    order: list[str] = []
    for source in sources:
        order.extend(name for name in source if name not in order)
    return order


class _MetricsReader:
    """Folds metrics.jsonl lines into the parts of a Run; unknown events are skipped."""

    def __init__(self) -> None:
        self.run_line: protocol.RunLine | None = None
        self.evaluations: list[Evaluation] = []
        self.updates: list[Update] = []
        self.lost: list[LostWork] = []
        self.lost_by_node: list[tuple[int | None, LostWork]] = []  # facility may still be unknown
        self.facility_of_node: dict[int, str] = {}
        self.jobs: dict[tuple[str, int], Job] = {}
        self.versions = 0
        self.times: list[float] = []
        self.facilities_met: list[str] = []
        self.scores: list[Scores] = []
        self.trained: dict[str, TrainedModel] = {}
        self.steps = 0

    def add(self, data: dict) -> None:
        line = protocol.from_json(data)
        handlers = {
            protocol.RunLine: self._run,
            protocol.RoundLine: self._round,
            protocol.VersionLine: self._version,
            protocol.EvaluationLine: self._evaluation,
            protocol.TrainingLine: self._training,
            protocol.UpdateLine: self._update,
            protocol.LostLine: self._lost,
            protocol.JobLine: self._job,
        }
        if line is not None:
            handlers[type(line)](line)

    def _met(self, facility: str | None) -> str:
        name = facility or UNKNOWN_FACILITY
        if name not in self.facilities_met:
            self.facilities_met.append(name)
        return name

    def _time(self, value) -> float:
        time = float(value)
        self.times.append(time)
        return time

    def _run(self, line: protocol.RunLine) -> None:
        self.run_line = line

    def _round(self, line: protocol.RoundLine) -> None:
        """Synchronous FedAvg: every facility listed trained on the round's model, so staleness 0."""
        time = self._time(line.wall_time)
        self.versions = max(self.versions, int(line.round))
        if line.eval is not None:
            self.evaluations.append(Evaluation(time, float(line.eval["loss"])))
            self._scores(None, int(line.round), time, line.eval)
        steps = line.train.get(protocol.TrainReport.KEYS["steps"])  # Flower's mean over the round's nodes
        for facility in line.facilities:
            self.updates.append(
                Update(self._met(facility), True, "", 0, time, None, None if steps is None else int(steps))
            )
        self.steps += len(line.facilities) * int(steps or 0)

    def _version(self, line: protocol.VersionLine) -> None:
        time = self._time(line.wall_time)
        self.versions = max(self.versions, int(line.version))
        if line.eval_loss is not None:
            self.evaluations.append(Evaluation(time, float(line.eval_loss)))
        if line.eval is not None:
            self._scores(None, int(line.version), time, line.eval)

    def _evaluation(self, line: protocol.EvaluationLine) -> None:
        """A facility's evaluation: it belongs to the time its version was published."""
        self._time(line.wall_time)
        time = self._time(line.version_time)
        if line.adapter is None:  # the run's global adapter; a local baseline's several models are not one curve
            self.evaluations.append(Evaluation(time, float(line.eval_loss)))
        self._scores(line.adapter, int(line.version), time, line.eval)

    def _scores(self, adapter: str | None, version: int, time: float, result: dict) -> None:
        tasks = result.get("tasks") or {}
        if tasks:  # loss-only evaluations have no per-task metrics
            self.scores.append(
                Scores(
                    adapter,
                    version,
                    time,
                    float(result["loss"]),
                    {task: float(metrics["exact_match"]) for task, metrics in tasks.items()},
                    (result.get("overall") or {}).get("exact_match"),
                )
            )

    def _training(self, line: protocol.TrainingLine) -> None:
        self._time(line.wall_time)
        for facility in line.facilities:
            self._met(facility)
        self.trained[line.adapter] = TrainedModel(
            line.adapter, list(line.facilities), int(line.steps), int(line.examples)
        )

    def _update(self, line: protocol.UpdateLine) -> None:
        if line.facility is not None:
            self.facility_of_node[line.node] = line.facility
        self.updates.append(
            Update(
                self._met(line.facility),
                bool(line.accepted),
                str(line.reason),
                int(line.staleness),
                self._time(line.arrival_time),
                self._optional_time(line.dispatch_time),
                line.steps,
            )
        )
        if line.accepted:
            self.steps += int(line.steps or 0)

    def _lost(self, line: protocol.LostLine) -> None:
        work = LostWork(
            line.facility or "", str(line.reason), self._time(line.time), self._optional_time(line.dispatch_time)
        )
        self.lost_by_node.append((line.node, work))

    def _optional_time(self, value) -> float | None:
        return None if value is None else self._time(value)

    def attribute_lost_work(self) -> None:
        """Work lost before its node ever replied is logged without a facility: the node's update
        lines name it (node ids are stable within a run), else it stays "unknown"."""
        for node, work in self.lost_by_node:
            facility = work.facility or self.facility_of_node.get(node)
            self.lost.append(replace(work, facility=self._met(facility)))

    def _job(self, line: protocol.JobLine) -> None:
        facility, time = self._met(line.facility), self._time(line.time)
        job = self.jobs.setdefault((facility, int(line.job)), Job(facility, int(line.job), int(line.nodes)))
        setattr(job, JOB_STATE_FIELDS[line.state], time)


# --- computing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateTally:
    accepted: int
    rejected: int  # refused for any reason other than staleness (validation, strategy rules)
    stale: int  # refused as too stale
    lost: int
    lost_at_walltime: int  # of `lost`: the batch job's walltime ended first
    mean_staleness: float | None  # over every update that arrived; None when none did


def tally(updates: Sequence[Update], lost: Sequence[LostWork]) -> UpdateTally:
    refused = [update for update in updates if not update.accepted]
    stale = sum(update.reason == "stale" for update in refused)
    at_walltime = sum(work.reason.startswith("walltime") for work in lost)
    mean = sum(update.staleness for update in updates) / len(updates) if updates else None
    return UpdateTally(len(updates) - len(refused), len(refused) - stale, stale, len(lost), at_walltime, mean)


@dataclass(frozen=True)
class NodeHours:
    """spent: jobs' running time x their nodes; busy: training that reached the server; lost:
    training that never did; idle: the rest of the time jobs ran."""

    spent: float
    busy: float
    lost: float

    @property
    def idle(self) -> float:
        return self.spent - self.busy - self.lost

    @property
    def wasted_share(self) -> float | None:
        return (self.idle + self.lost) / self.spent if self.spent > 0 else None


@dataclass(frozen=True)
class FacilityTimeline:
    queued: list[Interval]  # submitted, not yet running
    running: list[Interval]  # job running (busy, idle or losing work)
    busy: list[Interval]  # dispatch -> arrival of each update that reached the server
    lost: list[Interval]  # dispatch -> loss of each piece of lost work

    @property
    def empty(self) -> bool:
        return not (self.queued or self.running or self.busy or self.lost)


def facility_timeline(run: Run, facility: str) -> FacilityTimeline:
    jobs = [job for job in run.jobs if job.facility == facility]
    return FacilityTimeline(
        queued=[
            Interval(job.queued, job.ended if job.started is None else job.started)
            for job in jobs
            if job.queued is not None
        ],
        running=[Interval(job.started, job.ended) for job in jobs if job.started is not None],
        busy=[
            Interval(update.dispatch_time, update.arrival_time)
            for update in run.updates
            if update.facility == facility and update.dispatch_time is not None
        ],
        lost=[
            Interval(work.dispatch_time, work.time)
            for work in run.lost
            if work.facility == facility and work.dispatch_time is not None
        ],
    )


def facility_node_hours(run: Run, facility: str) -> NodeHours:
    """Running jobs are charged for all their nodes; an update or lost work occupies one
    SuperNode, i.e. nodes per job / SuperNodes per job of the facility's run-line shape."""
    timeline = facility_timeline(run, facility)
    ran = [job for job in run.jobs if job.facility == facility and job.started is not None]
    per_supernode = run.shape(facility).nodes_per_supernode
    return NodeHours(
        spent=sum((job.ended - job.started) * job.nodes for job in ran) / SECONDS_PER_HOUR,
        busy=sum(interval.seconds for interval in timeline.busy) * per_supernode / SECONDS_PER_HOUR,
        lost=sum(interval.seconds for interval in timeline.lost) * per_supernode / SECONDS_PER_HOUR,
    )


def time_to_target(evaluations: Sequence[Evaluation], target: float | None) -> float | None:
    """Time of the first evaluation at or below `target`; None if never (or no target)."""
    if target is None:
        return None
    return next((evaluation.time for evaluation in evaluations if evaluation.loss <= target), None)


@dataclass(frozen=True)
class FacilitySummary:
    facility: str
    tally: UpdateTally
    node_hours: NodeHours | None  # None without job lines (plain simulations)


@dataclass(frozen=True)
class RunSummary:
    run: Run
    final_loss: float | None
    time_to_target: float | None
    total: FacilitySummary  # facility "all"
    facilities: list[FacilitySummary]


def summarize(run: Run, target: float | None) -> RunSummary:
    facilities = []
    for facility in run.facilities:
        updates = [update for update in run.updates if update.facility == facility]
        lost = [work for work in run.lost if work.facility == facility]
        facilities.append(
            FacilitySummary(facility, tally(updates, lost), facility_node_hours(run, facility) if run.jobs else None)
        )
    total_hours = None
    if run.jobs:
        parts = [summary.node_hours for summary in facilities]
        total_hours = NodeHours(sum(p.spent for p in parts), sum(p.busy for p in parts), sum(p.lost for p in parts))
    return RunSummary(
        run=run,
        final_loss=run.evaluations[-1].loss if run.evaluations else None,
        time_to_target=time_to_target(run.evaluations, target),
        total=FacilitySummary("all", tally(run.updates, run.lost), total_hours),
        facilities=facilities,
    )


# --- presentation helpers shared by plots and summary ---------------------------------------------


def run_labels(runs: Sequence[Run]) -> list[str]:
    """The strategy, with the run folder's name where two runs share a strategy (and the full
    path where folder names collide too)."""
    labels = []
    for run in runs:
        shared = sum(other.strategy == run.strategy for other in runs) > 1
        same_name = sum(other.strategy == run.strategy and other.name == run.name for other in runs) > 1
        labels.append(f"{run.strategy} ({run.folder if same_name else run.name})" if shared else run.strategy)
    return labels


@dataclass(frozen=True)
class TimeUnit:
    name: str  # "s" or "h"
    seconds: float

    def of(self, seconds: float) -> float:
        return seconds / self.seconds


def time_unit(runs: Sequence[Run]) -> TimeUnit:
    """Hours when the longest run spans more than two hours, else seconds."""
    span = max((run.end_time for run in runs), default=0.0)
    return TimeUnit("h", SECONDS_PER_HOUR) if span > HOURS_AXIS_AFTER_SECONDS else TimeUnit("s", 1.0)


def time_axis_name(runs: Sequence[Run]) -> str:
    if all(run.virtual_time for run in runs):
        return "virtual time"
    if not any(run.virtual_time for run in runs):
        return "wall-clock time"
    return "time (virtual for emulated runs)"


# --- the trained models compared on the test set --------------------------------------------------


@dataclass(frozen=True)
class ModelResult:
    """One trained model's last test-set evaluation with per-task metrics, and the compute it had."""

    label: str
    strategy: str  # the run's; "" for the base model
    facilities: list[str]  # local baselines: whose shard; empty otherwise
    scores: Scores
    steps: int | None  # optimizer steps that went into it (None: not logged)
    examples: int | None  # examples they drew


BASE_MODEL = "base model"


def model_results(runs: Sequence[Run], labels: Sequence[str]) -> list[ModelResult]:
    """Every trained model of the runs at its last evaluation with per-task metrics: a run's global
    adapter, or each facility's model of a local baseline; led by the base model (no training: the
    first run's evaluation of its initial adapter, whose LoRA B is zero), when one was evaluated."""
    results = []
    initial = next(
        ((run, scores) for run in runs for scores in run.scores if scores.adapter is None and scores.version == 0),
        None,
    )
    if initial is not None:
        results.append(ModelResult(BASE_MODEL, "", [], initial[1], 0, 0))
    for run, label in zip(runs, labels, strict=True):
        latest: dict[str | None, Scores] = {}
        for scores in run.scores:
            if scores.version > 0 or scores.adapter is not None:
                latest[scores.adapter] = scores  # later lines are later evaluations
        for adapter, scores in latest.items():
            trained = run.trained.get(adapter or "adapter")
            steps = trained.steps if trained is not None else (run.steps or None)
            per_step = run.examples_per_step
            examples = trained.examples if trained is not None else (steps * per_step if steps and per_step else None)
            facilities = trained.facilities if trained is not None and adapter is not None else []
            name = f"{label}: {', '.join(facilities) or adapter}" if adapter is not None else label
            results.append(ModelResult(name, run.strategy, facilities, scores, steps, examples))
    return results


def task_order(results: Sequence[ModelResult]) -> list[str]:
    """Every task any model was scored on, in the order first met."""
    return facility_order(*(result.scores.exact_match for result in results))
