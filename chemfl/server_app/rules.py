"""Asynchronous aggregation rules as plain data: each arrival is weighed by its staleness, and the
global adapter moves without waiting for the slowest facility. The maths live in `aggregation`;
neither module needs Flower or torch. The Flower strategies in `strategies` run these rules in the
push/pull loop (`async_loop`).

The loop asks a rule three things: `plan_dispatch` (which idle nodes get work now, and how
many local steps), `submit` (one validated update; the new global adapter when a version is
published, else None) and `discard` (work that was lost or rejected). `observe` hears about every
finished or lost task (timings, remaining walltime). Buffers and optimizer state are plain data,
so the run loop can checkpoint and restore them exactly.
"""

from __future__ import annotations

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
