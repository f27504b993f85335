"""Asynchronous aggregation rules as plain data: each arrival is weighed by its staleness, and the
global adapter moves without waiting for the slowest facility. The maths live in `aggregation`;
neither module needs Flower or torch. The Flower strategies in `strategies` run these rules in the
push/pull loop (`async_loop`).

The loop asks a rule three things: `plan_dispatch` (which idle nodes get work now, and how
many local steps), `submit` (one validated update; the new global adapter when a version is
published, else None) and `discard` (work that was lost or rejected). `observe` hears about every
finished or lost task (timings, remaining walltime). Buffers and optimizer state are plain data,
so the run loop can checkpoint and restore them exactly.

FedCompass and FedQueue also aggregate on a clock (a group's deadline, a round's forced end): they
answer `due(current, version, now)` (the new global adapter when a deadline has passed) and
`next_due()` (when the next one falls, so a virtual clock can stop there); the loop asks `due`
before every dispatch, and the rules that aggregate on arrivals only answer None.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from chemfl.server_app.aggregation import (
    Params,
    ServerOptimizer,
    ServerOptimizerState,
    Staleness,
    delta,
    fedasync_mix,
    products,
    staleness_weight,
    svd_aggregate,
    weighted_mean_of_deltas,
)

LORA_AGGREGATIONS = ("naive", "svd")


@dataclass
class Update:
    node_id: int
    version_sent: int
    params: dict[str, np.ndarray]  # the node's trained adapter tensors
    num_examples: int
    train_loss: float


@dataclass(frozen=True)
class NodeView:
    """An idle online node, as the loop sees it when it may send work."""

    node_id: int
    facility: str
    now: float


@dataclass(frozen=True)
class TaskPlan:
    local_steps: int | None = None  # None: train.local-steps
    lr_scale: float | None = None  # FedQueue: the task trains at train.lr x this (None: train.lr)


@dataclass(frozen=True)
class TaskOutcome:
    """One finished or lost task: what the node reported and what the loop timed."""

    node_id: int
    facility: str
    dispatched: float
    finished: float
    steps: int | None = None
    train_seconds: float | None = None
    walltime_remaining: float | None = None  # seconds left in the node's batch job, if it knows
    lost: bool = False


class EveryIdleNode:
    """The dispatch rule of FedBuff and FedAsync: every idle node gets the default task at once."""

    def plan_dispatch(self, idle: list[NodeView], in_flight: int, online: int) -> dict[int, TaskPlan]:
        return {node.node_id: TaskPlan() for node in idle}

    def observe(self, outcome: TaskOutcome) -> None:
        """Timings are not used by this rule."""

    def discard(self, current: Params, outcome: TaskOutcome) -> dict[str, np.ndarray] | None:
        return None  # lost work changes nothing

    def due(self, current: Params, version: int, now: float) -> dict[str, np.ndarray] | None:
        return None  # aggregates on arrivals only, never on a clock

    def next_due(self) -> float | None:
        return None


@dataclass
class Verdict:
    """What happened to one update: its staleness, its weight, whether it was used."""

    staleness: int
    weight: float
    accepted: bool
    reason: str = ""


def admit(version: int, update: Update, staleness: Staleness, max_staleness: int | None) -> Verdict:
    """The update's staleness and weight; refused ("stale") past the cutoff."""
    tau = version - update.version_sent
    weight = staleness_weight(tau, staleness, max_staleness)
    return Verdict(tau, weight, weight > 0.0, "" if weight > 0.0 else "stale")


@dataclass
class FedBuffRule(EveryIdleNode):
    """FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation.

    Each arrival adds s(tau_i) * delta_i, delta_i = x_sent - y_i, to a buffer; after exactly K
    arrivals the server applies x <- x - eta_g * (sum_i s(tau_i) delta_i) / K (or feeds that
    mean to momentum / Adam), clears the buffer and publishes a new version. Updates staler than
    `max_staleness` are dropped and do not count towards K.

    LoRA: with `lora_aggregation = "naive"` A and B deltas are averaged separately, which is not
    the average of the updates B @ A (mean(B) mean(A) != mean(B A)); with FFA-LoRA (A frozen, only
    B exchanged) it is exact. `"svd"` aggregates the products B @ A and refactorises the result to
    rank r by truncated SVD (exact up to the rank-r truncation).
    """

    buffer_size: int
    staleness: Staleness
    max_staleness: int | None
    optimizer: ServerOptimizer
    lora_aggregation: str
    # State, not settings: left out of the repr that the strategy's summary logs (after a resume the
    # buffer holds K - 1 whole deltas).
    buffer: list[tuple[dict[str, np.ndarray], float]] = field(default_factory=list, repr=False)
    optimizer_state: ServerOptimizerState = field(default_factory=ServerOptimizerState, repr=False)

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"buffer size K = {self.buffer_size} must be >= 1")
        if self.lora_aggregation not in LORA_AGGREGATIONS:
            raise ValueError(f"lora.aggregation = {self.lora_aggregation!r}; use one of {', '.join(LORA_AGGREGATIONS)}")

    def _space(self, params: Params) -> dict[str, np.ndarray]:
        return products(params) if self.lora_aggregation == "svd" else {k: np.asarray(v) for k, v in params.items()}

    def submit(
        self, current: Params, version: int, sent: Params, update: Update
    ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        verdict = admit(version, update, self.staleness, self.max_staleness)
        if not verdict.accepted:
            return verdict, None
        self.buffer.append((delta(self._space(sent), self._space(update.params)), verdict.weight))
        if len(self.buffer) < self.buffer_size:
            return verdict, None
        taken, self.buffer = self.buffer[: self.buffer_size], self.buffer[self.buffer_size :]
        mean = weighted_mean_of_deltas([d for d, _ in taken], [w for _, w in taken], self.buffer_size)
        moved = self.optimizer.apply(self._space(current), mean, self.optimizer_state)
        if self.lora_aggregation == "svd":
            moved = svd_aggregate(current, moved)
        return verdict, {k: v.astype(np.asarray(current[k]).dtype) for k, v in moved.items()}


@dataclass
class FedAsyncRule(EveryIdleNode):
    """FedAsync (Xie et al., 2019): every arrival is mixed in at once,
    x <- (1 - a_t) x + a_t x_k with a_t = alpha * s(tau); each arrival publishes a version.
    Updates staler than `max_staleness` are dropped."""

    alpha: float
    staleness: Staleness
    max_staleness: int | None

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"FedAsync alpha = {self.alpha} must be in (0, 1]")

    def submit(
        self, current: Params, version: int, sent: Mapping, update: Update
    ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        verdict = admit(version, update, self.staleness, self.max_staleness)
        if not verdict.accepted:
            return verdict, None
        return verdict, fedasync_mix(current, update.params, self.alpha * verdict.weight)


@dataclass
class FedAvgRoundsRule(EveryIdleNode):
    """FedAvg (McMahan et al., AISTATS 2017) run by the push/pull loop, for virtual-time campaigns
    (Flower's own FedAvg waits on the real clock for nodes to come online).

    A round starts when nothing is in flight and at least `min_nodes` nodes are online: every
    online node gets the same version. The round closes when each has replied or lost its work;
    then x <- sum_k n_k x_k / sum_k n_k over the replies (a round with no reply publishes nothing
    and the next one starts from the same version). Nodes that come online mid-round wait.
    """

    min_nodes: int
    outstanding: int = 0
    replies: list[tuple[dict[str, np.ndarray], int]] = field(default_factory=list)

    def plan_dispatch(self, idle: list[NodeView], in_flight: int, online: int) -> dict[int, TaskPlan]:
        if self.outstanding or in_flight or len(idle) < self.min_nodes:
            return {}
        self.outstanding = len(idle)
        return {node.node_id: TaskPlan() for node in idle}

    def submit(
        self, current: Params, version: int, sent: Mapping, update: Update
    ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        self.replies.append((update.params, max(update.num_examples, 1)))
        return Verdict(version - update.version_sent, 1.0, True), self._close_if_done(current)

    def discard(self, current: Params, outcome: TaskOutcome) -> dict[str, np.ndarray] | None:
        return self._close_if_done(current)

    def _close_if_done(self, current: Params) -> dict[str, np.ndarray] | None:
        self.outstanding -= 1
        if self.outstanding > 0 or not self.replies:
            return None
        total = sum(n for _, n in self.replies)
        # The same weighted sum FedBuff takes of deltas, here of the adapters: sum_k n_k x_k / n.
        averaged = weighted_mean_of_deltas([p for p, _ in self.replies], [n for _, n in self.replies], total)
        self.replies = []
        return {name: value.astype(np.asarray(current[name]).dtype) for name, value in averaged.items()}


@dataclass
class FacilityEstimate:
    """What the server has learnt about one facility from its replies."""

    seconds_per_step: float | None = None  # moving average of train seconds / steps
    overhead_seconds: float = 0.0  # moving average of (round trip - training): start-up, load, transfer
    job_end: float | None = None  # when its current batch job ends (arrival + reported remaining walltime)
    job_seconds: float | None = None  # how long its jobs run, from the first job it was seen in
    online_since: float | None = None  # start of the job it is in, as far as the server saw
    offline_since: float | None = None  # its last job ended with work lost


@dataclass
class WalltimeAwareRule(FedAsyncRule):
    """Walltime-aware asynchronous aggregation: every task is planned around its facility's batch
    job from what the facilities report (the walltime budget of FedQueue, arXiv 2605.02125), and
    every arrival is mixed in at once with FedAsync's rule (Xie et al., 2019):
    x <- (1 - a) x + a x_k, a = alpha * s(tau), updates past `max_staleness` dropped.

    - Walltime fit: with J = job end - now - expected overhead - `margin_seconds` and s_i the
      facility's measured seconds per step, a task gets min(base_steps, J / s_i) steps; a task that
      cannot reach `min_steps` before the job ends is not sent (no lost work); when the time left
      after this task would be too short for another, this one takes it (up to `max_steps`).
    - Seconds per step and per-task overhead (start-up, model load, transfer) are moving averages of
      what replies report; the job end comes from the remaining walltime each reply carries (the
      launcher's SuperNodes report it; so does the emulated grid). Before a facility's first reply
      nothing is known and it gets `base_steps`; a later job's end is extrapolated from the length
      of its earlier ones. Estimates are relearned after a resume.

    FedAsync's rule, not FedBuff's buffer: on the emulated four-facility campaigns a version per
    arrival reached the target loss in about half the updates of FedBuff's K = 3 (README, Measured).
    """

    base_steps: int
    min_steps: int
    max_steps: int
    margin_seconds: float
    momentum: float
    estimates: dict[str, FacilityEstimate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_steps <= self.base_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= min-local-steps ({self.min_steps}) <= train.local-steps "
                f"({self.base_steps}) <= max-local-steps ({self.max_steps})"
            )
        if self.margin_seconds < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"walltime-margin ({self.margin_seconds}) must be >= 0 and estimate-momentum "
                f"({self.momentum}) in [0, 1)"
            )

    def plan_dispatch(self, idle: list[NodeView], in_flight: int, online: int) -> dict[int, TaskPlan]:
        plans = {}
        for node in idle:
            steps = self.plan_steps(node.facility, node.now)
            if steps is not None:
                plans[node.node_id] = TaskPlan(steps)
        return plans

    def plan_steps(self, facility: str, now: float) -> int | None:
        """Local steps for a task sent now, or None when no useful task fits before the job ends."""
        estimate = self._seen_online(facility, now)
        step_seconds = estimate.seconds_per_step
        if estimate.job_end is None or not step_seconds:
            return self.base_steps
        fits = int((estimate.job_end - now - estimate.overhead_seconds - self.margin_seconds) // step_seconds)
        if fits < self.min_steps:
            return None
        steps = min(self.base_steps, fits)
        if fits - steps < self.min_steps + estimate.overhead_seconds / step_seconds:
            steps = min(fits, self.max_steps)  # the tail would be too short for another task: use it now
        return steps

    def observe(self, outcome: TaskOutcome) -> None:
        estimate = self.estimates.setdefault(outcome.facility, FacilityEstimate())
        if outcome.lost:
            estimate.offline_since, estimate.job_end = outcome.finished, None
            return
        if outcome.steps and outcome.train_seconds:
            per_step = outcome.train_seconds / outcome.steps
            estimate.seconds_per_step = (
                per_step
                if estimate.seconds_per_step is None
                else self.momentum * estimate.seconds_per_step + (1 - self.momentum) * per_step
            )
            overhead = max(0.0, outcome.finished - outcome.dispatched - outcome.train_seconds)
            estimate.overhead_seconds = (
                self.momentum * estimate.overhead_seconds + (1 - self.momentum) * overhead
                if estimate.overhead_seconds
                else overhead
            )
        if outcome.walltime_remaining is not None:
            estimate.job_end = outcome.finished + outcome.walltime_remaining
            if estimate.online_since is not None:
                estimate.job_seconds = max(estimate.job_seconds or 0.0, estimate.job_end - estimate.online_since)

    def _seen_online(self, facility: str, now: float) -> FacilityEstimate:
        """Notes a facility (re)appearing: a new job once its last known job has ended."""
        estimate = self.estimates.setdefault(facility, FacilityEstimate())
        job_over = estimate.job_end is not None and now >= estimate.job_end
        if estimate.online_since is None or job_over or estimate.offline_since is not None:
            estimate.online_since, estimate.offline_since = now, None
            estimate.job_end = now + estimate.job_seconds if estimate.job_seconds else None
        return estimate


# --- Rules that aggregate on a clock --------------------------------------------------------------


@dataclass
class Buffered:
    """An update held until the aggregation that uses it."""

    node_id: int
    facility: str
    version_sent: int
    steps: int  # the local steps its task was given
    params: dict[str, np.ndarray]


def _as_dtypes(current: Params, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value).astype(np.asarray(current[name]).dtype) for name, value in values.items()}


def _base(current: Params, published: dict[str, np.ndarray] | None) -> Params:
    """What the next aggregation in the same call starts from: what was just published, else `current`."""
    return current if published is None else published


def ema(old: float | None, new: float, weight_of_new: float) -> float:
    """Exponential moving average; the first observation is taken as it is."""
    return new if old is None else weight_of_new * new + (1 - weight_of_new) * old


@dataclass
class ArrivalGroup:
    """FedCompass's arrival group: nodes whose tasks were sized to arrive together."""

    expected: float  # when its members should arrive
    latest: float  # its deadline: created + latest_time_factor x (expected - created)
    pending: dict[int, str] = field(default_factory=dict)  # members still training -> their facility
    arrived: dict[int, Buffered] = field(default_factory=dict)  # members' updates, waiting for the group
    closed: bool = False  # aggregated or past its deadline: nobody joins, later members are late


@dataclass(frozen=True)
class CompassTask:
    group: int | None  # None: the node's first task (its speed unknown), aggregated alone on arrival
    facility: str
    steps: int


@dataclass
class FedCompassRule:
    """FedCompass (Li et al., ICLR 2024): a computing-power-aware scheduler, as in APPFL's
    CompassScheduler and FedCompassAggregator (the authors' code).

    - Speed: each facility's seconds per step S_i is a moving average of (arrival - dispatch) /
      steps; the newest measurement weighs `speed_momentum`. A node's first task, before its
      speed is known, has Q_max steps and is mixed in alone when it arrives.
    - Groups: a node given work joins the open group whose expected arrival T_a it can reach with
      Q = floor((T_a - now) / S_i) in [Q_min, Q_max] steps (the largest such Q), so a slower node
      gets fewer steps; failing that it founds a group, with Q sized so that it arrives one Q_max
      of the group's fastest member after an existing group's deadline (Q_min at least; Q_max when
      no group is open); its deadline is now + Q S_i x `latest_time_factor`. Nodes are assigned
      fastest first.
    - Aggregation: when every member has arrived, or at the deadline with those that have, the
      group's updates and the late updates kept since the last aggregation are mixed in:
      x <- (1 - sum_i a_i) x + sum_i a_i y_i, a_i = alpha s(tau_i) / N (N = `num_clients`, or the
      number of updates if more); s is the staleness function, updates past `max_staleness` weigh
      0. Members wait for their group; a member arriving after the deadline is late: its update
      is kept for the next group aggregation and it gets new work at once. A member whose work is
      lost or rejected leaves its group (a group whose other members have all arrived then
      aggregates at once).
    """

    alpha: float
    staleness: Staleness
    max_staleness: int | None
    min_steps: int
    max_steps: int
    speed_momentum: float
    latest_time_factor: float
    num_clients: int
    speeds: dict[str, float] = field(default_factory=dict, repr=False)  # facility -> seconds per step
    tasks: dict[int, CompassTask] = field(default_factory=dict, repr=False)  # node -> its task in flight
    groups: dict[int, ArrivalGroup] = field(default_factory=dict, repr=False)
    late: dict[int, Buffered] = field(default_factory=dict, repr=False)  # merged into the next group aggregation
    clock: float = field(default=0.0, repr=False)
    version: int = field(default=0, repr=False)
    next_group: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"strategy.fedcompass-alpha = {self.alpha} must be in (0, 1]")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"need 1 <= strategy.fedcompass-min-steps ({self.min_steps}) <= strategy.fedcompass-max-steps "
                f"({self.max_steps})"
            )
        if not 0 < self.speed_momentum <= 1:
            raise ValueError(
                f"strategy.fedcompass-speed-momentum = {self.speed_momentum} must be in (0, 1] (the newest "
                "speed measurement's weight)"
            )
        if self.latest_time_factor < 1:
            raise ValueError(
                f"strategy.fedcompass-latest-time-factor = {self.latest_time_factor} must be >= 1 (a group's "
                "deadline cannot come before its expected arrival)"
            )
        if self.num_clients < 1:
            raise ValueError(f"FedCompass needs at least one client (data.facilities), not {self.num_clients}")

    # --- dispatch --------------------------------------------------------------------------------

    def plan_dispatch(self, idle: list[NodeView], in_flight: int, online: int) -> dict[int, TaskPlan]:
        self.clock = max([self.clock, *(node.now for node in idle)])
        waiting = {node for group in self.groups.values() for node in group.arrived}
        ready = [node for node in idle if node.node_id not in waiting]
        plans = {}
        for node in sorted(ready, key=lambda n: (self.speeds.get(n.facility, math.inf), n.node_id)):  # fastest first
            if node.facility in self.speeds:
                group, steps = self._assign(node.facility, node.now)
            else:
                group, steps = None, self.max_steps
            self.tasks[node.node_id] = CompassTask(group, node.facility, steps)
            if group is not None:
                self.groups[group].pending[node.node_id] = node.facility
            plans[node.node_id] = TaskPlan(steps)
        return plans

    def _assign(self, facility: str, now: float) -> tuple[int, int]:
        """(group, local steps) for a node of `facility` given work now: join a group, else found one."""
        speed = self.speeds[facility]
        best, best_steps = None, -1
        for number, group in self.groups.items():
            steps = math.floor((group.expected - now) / speed)
            if not group.closed and self.min_steps <= steps <= self.max_steps and steps >= best_steps:
                best, best_steps = number, steps
        if best is not None:
            return best, best_steps
        steps = self._founding_steps(speed, now)
        number, self.next_group = self.next_group, self.next_group + 1
        self.groups[number] = ArrivalGroup(now + steps * speed, now + steps * speed * self.latest_time_factor)
        return number, steps

    def _founding_steps(self, speed: float, now: float) -> int:
        """A new group's steps: arrive one Q_max of an open group's fastest member after its deadline."""
        steps = -1
        for group in self.groups.values():
            if group.closed or now >= group.latest:
                continue
            members = [*group.pending.values(), *(entry.facility for entry in group.arrived.values())]
            fastest = min(self.speeds[facility] for facility in members)
            reach = math.floor((group.latest + fastest * self.max_steps - now) / speed)
            if reach <= self.max_steps:
                steps = max(steps, reach)
        return self.max_steps if steps < 0 else max(steps, self.min_steps)

    # --- arrivals --------------------------------------------------------------------------------

    def observe(self, outcome: TaskOutcome) -> None:
        self.clock = max(self.clock, outcome.finished)
        task = self.tasks.get(outcome.node_id)
        if outcome.lost or task is None:
            return
        measured = (outcome.finished - outcome.dispatched) / task.steps
        self.speeds[outcome.facility] = ema(self.speeds.get(outcome.facility), measured, self.speed_momentum)

    def submit(
        self, current: Params, version: int, sent: Mapping, update: Update
    ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        self.version = version
        published = self._expire(current, inclusive=False)
        verdict = admit(version, update, self.staleness, self.max_staleness)
        task = self.tasks.pop(update.node_id, None)
        if not verdict.accepted:
            complete = self._leave(update.node_id, task)
        else:
            steps = task.steps if task is not None else self.max_steps
            facility = task.facility if task is not None else str(update.node_id)
            entry = Buffered(update.node_id, facility, update.version_sent, steps, update.params)
            if task is None or task.group is None:  # a first task: mixed in alone (APPFL's single update)
                return verdict, self._published(self._mix(_base(current, published), [entry]))
            complete = self._arrive(entry, task.group)
        if complete is not None:
            published = self._aggregate_group(_base(current, published), complete)
        return verdict, self._published(published)

    def discard(self, current: Params, outcome: TaskOutcome) -> dict[str, np.ndarray] | None:
        published = self._expire(current, inclusive=False)
        complete = self._leave(outcome.node_id, self.tasks.pop(outcome.node_id, None))
        if complete is not None:
            published = self._aggregate_group(_base(current, published), complete)
        return self._published(published)

    def _arrive(self, entry: Buffered, number: int) -> int | None:
        """Files a member's update; the group's number when it is now complete."""
        group = self.groups.get(number)
        if group is None or group.closed or self.clock > group.latest:  # late: kept for the next aggregation
            self._leave(entry.node_id, CompassTask(number, entry.facility, entry.steps))
            self.late[entry.node_id] = entry
            return None
        del group.pending[entry.node_id]
        group.arrived[entry.node_id] = entry
        return None if group.pending else number

    def _leave(self, node_id: int, task: CompassTask | None) -> int | None:
        """Takes a member that will not arrive out of its group; the group's number when the
        members left have all arrived (it aggregates now)."""
        group = None if task is None or task.group is None else self.groups.get(task.group)
        if group is None or node_id not in group.pending:
            return None
        del group.pending[node_id]
        if group.pending:
            return None
        if group.arrived and not group.closed:
            return task.group
        del self.groups[task.group]
        return None

    # --- aggregation -----------------------------------------------------------------------------

    def due(self, current: Params, version: int, now: float) -> dict[str, np.ndarray] | None:
        """Aggregates every group whose deadline has passed by `now` (with the members that arrived)."""
        self.version, self.clock = version, max(self.clock, now)
        return self._published(self._expire(current, inclusive=True))

    def next_due(self) -> float | None:
        """The next deadline at which a group with arrived members would aggregate."""
        deadlines = [g.latest for g in self.groups.values() if g.arrived and not g.closed and g.latest > self.clock]
        return min(deadlines, default=None)

    def _expire(self, current: Params, inclusive: bool) -> dict[str, np.ndarray] | None:
        published = None
        for number, group in sorted(self.groups.items(), key=lambda item: item[1].latest):
            passed = group.latest < self.clock or (inclusive and group.latest <= self.clock)
            if group.closed or not passed:
                continue
            if group.arrived:
                published = self._aggregate_group(_base(current, published), number)
            else:
                group.closed = True
        return published

    def _aggregate_group(self, current: Params, number: int) -> dict[str, np.ndarray]:
        group = self.groups[number]
        entries = {**self.late, **group.arrived}
        self.late, group.arrived, group.closed = {}, {}, True  # its members are free for new work
        if not group.pending:
            del self.groups[number]
        return self._mix(current, list(entries.values()))

    def _mix(self, current: Params, entries: list[Buffered]) -> dict[str, np.ndarray]:
        """x <- (1 - sum_i a_i) x + sum_i a_i y_i with a_i = alpha s(tau_i) / N."""
        share = self.alpha / max(self.num_clients, len(entries))
        weights = [
            share * staleness_weight(self.version - e.version_sent, self.staleness, self.max_staleness) for e in entries
        ]
        mixed = weighted_mean_of_deltas(
            [current, *(e.params for e in entries)], [1.0 - sum(weights), *weights], divisor=1
        )
        return _as_dtypes(current, mixed)

    def _published(self, params: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        if params is not None:
            self.version += 1
        return params


QUEUE_STALENESS = ("constant", "harmonic", "exponential")


def queue_staleness_factor(name: str, beta: float, tau: int) -> float:
    """FedQueue's phi(tau): constant 1, harmonic 1 / (1 + beta tau), exponential exp(-beta tau)."""
    if name == "constant":
        return 1.0
    if name == "harmonic":
        return 1.0 / (1.0 + beta * tau)
    return math.exp(-beta * tau)


def fedqueue_weights(factors: list[float], steps: list[int]) -> list[float]:
    """FedQueue's aggregation weights: phi(tau_k) E_k / sum_j E_j, normalised to sum to 1."""
    total_steps = sum(steps)
    raw = [factor * step / total_steps for factor, step in zip(factors, steps, strict=True)]
    return [value / sum(raw) for value in raw]


@dataclass(frozen=True)
class QueueTask:
    facility: str
    steps: int
    delay: float  # seconds from the node's release (its round's start) to this dispatch
    admitted: bool  # delay <= predicted wait + admission x T_sync: counted in its own round


@dataclass
class FedQueueRule:
    """FedQueue (Li et al., arXiv 2605.02125, 2026): queue-aware semi-synchronous rounds, as in
    APPFL's QueueScheduler and FedQueueAggregator (the authors' code).

    - Queue delay: a task's delay q is the time from its node's release (the start of the round
      that wants its update) to its dispatch: zero while the facility's batch job runs, the rest
      of its queue wait when its job has ended. The predicted wait q_hat of a facility is a moving
      average of its delays (starting at `q_init`; the newest weighs `queue_alpha`), and its
      seconds per step s a moving average of what replies report (`compute_alpha`).
    - Work budget: J = max(0.5, T_sync - q_hat - `safety_margin`) seconds, so a task asks for
      max(floor(J / s), `min_steps`) local steps (a facility's first task, before s is known,
      `min_steps`), at learning rate train.lr x min_steps_now / steps, where min_steps_now is the
      fewest steps any facility would now be given (its first task: train.lr).
    - Admission: an update whose delay is within q_hat + `admission` x T_sync belongs to its
      round; a later one is buffered and merged into the next round's aggregation, with its
      staleness. A node waits, after its update, until the aggregation that uses it.
    - Aggregation: when updates (admitted or buffered) from `num_clients` nodes are in, or
      (1 + `tolerance`) x T_sync after the previous aggregation (the first: after the first
      arrival), x <- sum_k p_k y_k with p_k = phi(tau_k) E_k / sum_j E_j normalised to sum to 1
      (E_k: its steps; phi: `staleness` constant | harmonic 1/(1 + beta tau) | exponential
      exp(-beta tau)). Only buffered late updates in a round: they are used. Nothing at all: the
      round ends with its next arrival.
    """

    t_sync: float
    q_init: float
    queue_alpha: float
    compute_alpha: float
    safety_margin: float
    min_steps: int
    admission: float
    tolerance: float
    staleness: str
    staleness_beta: float
    num_clients: int
    run_start: float = field(default=0.0, repr=False)  # the loop's clock at the start (a resume's elapsed time)
    queue_wait: dict[str, float] = field(default_factory=dict, repr=False)  # facility -> predicted delay q_hat
    step_seconds: dict[str, float] = field(default_factory=dict, repr=False)  # facility -> seconds per step
    tasks: dict[int, QueueTask] = field(default_factory=dict, repr=False)  # node -> its task in flight
    released: dict[str, float] = field(default_factory=dict, repr=False)  # facility -> its round's start
    waiting: set[int] = field(default_factory=set, repr=False)  # nodes whose update awaits aggregation
    admitted: dict[int, Buffered] = field(default_factory=dict, repr=False)
    late: list[Buffered] = field(default_factory=list, repr=False)
    deadline: float | None = field(default=None, repr=False)  # the forced aggregation
    clock: float = field(default=0.0, repr=False)
    version: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        checks = [
            (self.t_sync > 0, f"strategy.fedqueue-t-sync = {self.t_sync} must be > 0 seconds"),
            (self.q_init >= 0, f"strategy.fedqueue-queue-init = {self.q_init} must be >= 0 seconds"),
            (0 < self.queue_alpha <= 1, f"strategy.fedqueue-queue-alpha = {self.queue_alpha} must be in (0, 1]"),
            (0 < self.compute_alpha <= 1, f"strategy.fedqueue-compute-alpha = {self.compute_alpha} must be in (0, 1]"),
            (self.safety_margin >= 0, f"strategy.fedqueue-safety-margin = {self.safety_margin} must be >= 0"),
            (self.min_steps >= 1, f"strategy.fedqueue-min-steps = {self.min_steps} must be >= 1"),
            (self.admission >= 0, f"strategy.fedqueue-admission = {self.admission} must be >= 0"),
            (self.tolerance >= 0, f"strategy.fedqueue-tolerance = {self.tolerance} must be >= 0"),
            (self.staleness_beta >= 0, f"strategy.fedqueue-staleness-beta = {self.staleness_beta} must be >= 0"),
            (self.num_clients >= 1, f"FedQueue needs at least one client (data.facilities), not {self.num_clients}"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(problem)
        if self.staleness not in QUEUE_STALENESS:
            raise ValueError(
                f"strategy.fedqueue-staleness = {self.staleness!r}; use one of {', '.join(QUEUE_STALENESS)}"
            )

    # --- planning --------------------------------------------------------------------------------

    def budget(self, facility: str) -> float:
        """J: the seconds of work that fit a round after the predicted queue wait and the margin."""
        return max(0.5, self.t_sync - self.queue_wait.get(facility, self.q_init) - self.safety_margin)

    def planned_steps(self, facility: str) -> int:
        seconds = self.step_seconds.get(facility)
        if seconds is None:
            return self.min_steps  # warm-up: nothing measured yet
        return max(math.floor(self.budget(facility) / seconds), self.min_steps)

    def lr_scale(self, facility: str) -> float:
        """min_steps_now / steps: equal steps x learning rate across facilities (1 before a measurement)."""
        if facility not in self.step_seconds:
            return 1.0
        fewest = min(self.planned_steps(other) for other in self.step_seconds)
        return fewest / self.planned_steps(facility)

    def plan_dispatch(self, idle: list[NodeView], in_flight: int, online: int) -> dict[int, TaskPlan]:
        plans = {}
        for node in idle:
            self.clock = max(self.clock, node.now)
            if node.node_id in self.waiting:
                continue
            predicted = self.queue_wait.get(node.facility, self.q_init)
            delay = max(0.0, node.now - self.released.get(node.facility, self.run_start))
            steps, scale = self.planned_steps(node.facility), self.lr_scale(node.facility)
            admitted = delay <= predicted + self.admission * self.t_sync
            self.tasks[node.node_id] = QueueTask(node.facility, steps, delay, admitted)
            self.queue_wait[node.facility] = ema(predicted, delay, self.queue_alpha)
            plans[node.node_id] = TaskPlan(steps, scale)
        return plans

    # --- arrivals --------------------------------------------------------------------------------

    def observe(self, outcome: TaskOutcome) -> None:
        self.clock = max(self.clock, outcome.finished)
        if outcome.lost or not outcome.steps or not outcome.train_seconds:
            return
        per_step = outcome.train_seconds / outcome.steps
        self.step_seconds[outcome.facility] = ema(self.step_seconds.get(outcome.facility), per_step, self.compute_alpha)

    def submit(
        self, current: Params, version: int, sent: Mapping, update: Update
    ) -> tuple[Verdict, dict[str, np.ndarray] | None]:
        self.version = version
        published = self._expire(current, inclusive=False)
        task = self.tasks.pop(update.node_id, None)
        tau = version - update.version_sent
        facility = task.facility if task is not None else str(update.node_id)
        steps = task.steps if task is not None else self.min_steps
        entry = Buffered(update.node_id, facility, update.version_sent, steps, update.params)
        if task is None or task.admitted:
            self.admitted[update.node_id] = entry
        else:
            self.late.append(entry)
        self.waiting.add(update.node_id)
        if self.deadline is None:
            self.deadline = self.clock + (1 + self.tolerance) * self.t_sync
        arrived = len(self.admitted) + len(self.late)
        if arrived >= self.num_clients or self.clock >= self.deadline:
            published = self._aggregate(_base(current, published), self.clock) or published
        verdict = Verdict(tau, queue_staleness_factor(self.staleness, self.staleness_beta, tau), True)
        return verdict, self._published(published)

    def discard(self, current: Params, outcome: TaskOutcome) -> dict[str, np.ndarray] | None:
        """Lost or rejected work: the node gets a new task when it is idle again; its delay still
        counts from its round's start."""
        published = self._expire(current, inclusive=False)
        self.tasks.pop(outcome.node_id, None)
        return self._published(published)

    # --- aggregation -----------------------------------------------------------------------------

    def due(self, current: Params, version: int, now: float) -> dict[str, np.ndarray] | None:
        """The forced aggregation, when (1 + tolerance) x T_sync have passed since the last one."""
        self.version, self.clock = version, max(self.clock, now)
        return self._published(self._expire(current, inclusive=True))

    def next_due(self) -> float | None:
        pending = self.admitted or self.late
        return self.deadline if pending and self.deadline is not None and self.deadline > self.clock else None

    def _expire(self, current: Params, inclusive: bool) -> dict[str, np.ndarray] | None:
        if self.deadline is None:
            return None
        passed = self.deadline < self.clock or (inclusive and self.deadline <= self.clock)
        return self._aggregate(current, self.deadline) if passed else None

    def _aggregate(self, current: Params, at: float) -> dict[str, np.ndarray] | None:
        """The round's aggregation at time `at`; None when there is nothing to aggregate."""
        carried = [entry for entry in self.late if entry.version_sent < self.version]  # late from earlier rounds
        self.late = [entry for entry in self.late if entry.version_sent >= self.version]
        used = [*self.admitted.values(), *carried] or self.late
        if not used:
            return None
        if used is self.late:
            self.late = []
        self.admitted = {}
        factors = [
            queue_staleness_factor(self.staleness, self.staleness_beta, self.version - e.version_sent) for e in used
        ]
        weights = fedqueue_weights(factors, [entry.steps for entry in used])
        aggregated = weighted_mean_of_deltas([entry.params for entry in used], weights, divisor=1)
        for entry in used:
            self.waiting.discard(entry.node_id)
            self.released[entry.facility] = at
        self.deadline = at + (1 + self.tolerance) * self.t_sync
        return _as_dtypes(current, aggregated)

    def _published(self, params: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        if params is not None:
            self.version += 1
        return params
