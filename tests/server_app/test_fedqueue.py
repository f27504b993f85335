"""FedQueue (Li et al., arXiv 2605.02125) as a pure rule: queue-wait prediction, work budgets,
learning-rate scale, admission, carried-over late updates, forced aggregation, weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.server_app.rules import (
    FedQueueRule,
    NodeView,
    TaskOutcome,
    Update,
    fedqueue_weights,
    queue_staleness_factor,
)
from chemfl.server_app.strategies import FedQueue, make_strategy
from chemfl.server_app.strategy_spec import StrategySpec
from tests.server_app.rule_defaults import adapter, rule


def fedqueue(**changes) -> FedQueueRule:
    return rule("fedqueue", **changes)


class Run:
    """Plays the push/pull loop by hand, one node per facility, with explicit times."""

    def __init__(self, strategy: FedQueueRule, facilities: dict[int, str]) -> None:
        self.rule, self.facilities = strategy, facilities
        self.params, self.version = adapter(0.0), 0
        self.sent: dict[int, tuple[float, int, int]] = {}  # node -> (dispatch time, version sent, steps)
        self.lr_scales: dict[int, float] = {}

    def dispatch(self, now: float, *nodes: int) -> dict[int, int]:
        plans = self.rule.plan_dispatch([NodeView(n, self.facilities[n], now) for n in nodes], 0, len(nodes))
        for node, plan in plans.items():
            self.sent[node] = (now, self.version, plan.local_steps)
            self.lr_scales[node] = plan.lr_scale
        return {node: plan.local_steps for node, plan in plans.items()}

    def arrive(self, node: int, now: float, value: float, seconds_per_step: float = 1.0):
        dispatched, version_sent, steps = self.sent.pop(node)
        outcome = TaskOutcome(node, self.facilities[node], dispatched, now, steps, steps * seconds_per_step)
        self.rule.observe(outcome)
        verdict, published = self.rule.submit(
            self.params, self.version, adapter(0.0), Update(node, version_sent, adapter(value), 10, 1.0)
        )
        self._publish(published)
        return verdict, published

    def due(self, now: float):
        published = self.rule.due(self.params, self.version, now)
        self._publish(published)
        return published

    def _publish(self, published) -> None:
        if published is not None:
            self.params, self.version = published, self.version + 1


def test_the_budget_shrinks_as_the_predicted_wait_grows_and_steps_never_drop_below_the_minimum():
    strategy = fedqueue(t_sync=3600.0, safety_margin=60.0, min_steps=20)
    strategy.step_seconds["polaris"] = 10.0
    steps, budgets = [], []
    for wait in (0.0, 600.0, 1800.0, 3000.0, 3500.0, 10_000.0):
        strategy.queue_wait["polaris"] = wait
        budgets.append(strategy.budget("polaris"))
        steps.append(strategy.planned_steps("polaris"))
    assert budgets[:3] == [3540.0, 2940.0, 1740.0] and budgets[-1] == 0.5  # J = max(0.5, T - q - theta)
    assert steps[:3] == [354, 294, 174]  # floor(J / s)
    assert steps == sorted(steps, reverse=True) and min(steps) == 20  # never below the minimum


def test_first_tasks_are_warm_up_tasks_at_the_base_learning_rate():
    run = Run(fedqueue(min_steps=20), {1: "polaris"})
    assert run.dispatch(0.0, 1) == {1: 20} and run.lr_scales[1] == 1.0


def test_the_learning_rate_scale_is_the_fewest_steps_over_the_tasks_steps():
    strategy = fedqueue(t_sync=1000.0, safety_margin=0.0, min_steps=1, num_clients=2)
    run = Run(strategy, {1: "fast", 2: "slow"})
    strategy.step_seconds.update(fast=1.0, slow=4.0)
    strategy.queue_wait.update(fast=0.0, slow=0.0)
    assert run.dispatch(0.0, 1, 2) == {1: 1000, 2: 250}
    assert run.lr_scales == {1: pytest.approx(250 / 1000), 2: 1.0}
    assert all(run.lr_scales[n] * steps == pytest.approx(250) for n, steps in ((1, 1000), (2, 250)))


def test_the_predicted_wait_is_a_moving_average_of_delays_from_a_rounds_start_to_dispatch():
    strategy = fedqueue(q_init=2.0, queue_alpha=0.5, num_clients=2)
    run = Run(strategy, {1: "polaris", 2: "frontier"})
    run.dispatch(0.0, 1)  # online at the start: no delay
    run.dispatch(600.0, 2)  # came online 600 s into the round
    assert strategy.queue_wait == {"polaris": pytest.approx(1.0), "frontier": pytest.approx(0.5 * 600 + 0.5 * 2.0)}
    assert strategy.tasks[2].delay == 600.0


def test_updates_within_the_cutoff_aggregate_with_weights_steps_over_total_steps():
    run = Run(fedqueue(min_steps=2, num_clients=2, t_sync=362.0, q_init=2.0, safety_margin=60.0), {1: "a", 2: "b"})
    run.rule.step_seconds.update(a=3.0, b=1.0)
    assert run.dispatch(0.0, 1, 2) == {1: 100, 2: 300}  # J = 300 s of work
    assert run.arrive(1, 100.0, 1.0)[1] is None
    assert run.dispatch(100.0, 1) == {}  # a node waits for the aggregation that uses its update
    _, published = run.arrive(2, 120.0, 5.0)
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(0.25 * 1.0 + 0.75 * 5.0)
    assert set(run.dispatch(120.0, 1, 2)) == {1, 2}  # both released


def test_a_late_update_is_merged_into_the_next_round_with_its_staleness():
    strategy = fedqueue(min_steps=2, num_clients=2, staleness="harmonic", staleness_beta=1.0)
    run = Run(strategy, {1: "a", 2: "b"})
    run.dispatch(0.0, 1)
    cutoff = 2.0 + 0.2 * 3600.0  # the predicted wait (q_init) + admission x T_sync
    run.dispatch(cutoff + 100.0, 2)  # node 2 came online too late for round 0
    assert not strategy.tasks[2].admitted and strategy.tasks[1].admitted
    run.arrive(1, 50.0, 1.0)
    verdict, published = run.arrive(2, cutoff + 150.0, 5.0)  # everyone is in: round 0 closes without node 2
    assert verdict.accepted and published["m.lora_A.weight"][0, 0] == pytest.approx(1.0)
    assert [entry.node_id for entry in strategy.late] == [2] and run.dispatch(cutoff + 150.0, 2) == {}
    steps_1 = run.dispatch(cutoff + 150.0, 1)[1]
    _, published = run.arrive(1, cutoff + 300.0, 3.0)  # round 1: node 1, and node 2's update of round 0
    phi = queue_staleness_factor("harmonic", 1.0, 1)  # node 2's staleness is 1: phi = 1/2
    weights = fedqueue_weights([1.0, phi], [steps_1, 2])
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(weights[0] * 3.0 + weights[1] * 5.0, rel=1e-6)
    assert not strategy.late and set(run.dispatch(cutoff + 300.0, 1, 2)) == {1, 2}


def test_only_late_updates_in_a_round_are_used_rather_than_nothing():
    strategy = fedqueue(min_steps=2, num_clients=1)
    run = Run(strategy, {1: "a"})
    run.dispatch(5000.0, 1)  # far past the cutoff
    _, published = run.arrive(1, 5100.0, 4.0)
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(4.0) and not strategy.late


def test_aggregation_is_forced_after_one_plus_tolerance_times_t_sync():
    strategy = fedqueue(min_steps=2, num_clients=3, t_sync=1000.0, tolerance=0.15)
    run = Run(strategy, {1: "a", 2: "b", 3: "c"})
    run.dispatch(0.0, 1, 2, 3)
    assert run.arrive(1, 100.0, 2.0)[1] is None
    deadline = 100.0 + 1.15 * 1000.0  # the first round's clock starts with the first arrival
    assert strategy.next_due() == pytest.approx(deadline)
    assert run.due(deadline - 1.0) is None
    published = run.due(deadline)
    assert published is not None and published["m.lora_A.weight"][0, 0] == pytest.approx(2.0)
    assert strategy.deadline == pytest.approx(deadline + 1150.0)  # the next round's, from this aggregation
    # Without a call to `due`, the passed deadline is handled at the next arrival, as of the deadline.
    run.dispatch(deadline, 1)
    run.arrive(1, deadline + 10.0, 6.0)
    _, published = run.arrive(2, strategy.deadline + 5.0, 8.0)
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(6.0)  # node 1's round; node 2 waits for the next
    assert [entry.node_id for entry in strategy.late] + list(strategy.admitted) == [2]


def test_a_round_with_nothing_by_its_deadline_ends_with_its_next_arrival():
    strategy = fedqueue(min_steps=2, num_clients=2, t_sync=100.0)
    run = Run(strategy, {1: "a", 2: "b"})
    run.dispatch(0.0, 1, 2)
    run.arrive(1, 10.0, 1.0)
    run.arrive(2, 20.0, 3.0)  # all in: aggregated, the next round's deadline is 20 + 115
    run.dispatch(20.0, 1, 2)
    assert run.due(135.0) is None and strategy.next_due() is None  # nothing arrived yet
    assert run.arrive(1, 500.0, 7.0)[1] is not None  # the overdue round closes with it


@pytest.mark.parametrize("seed", range(5))
def test_weights_are_staleness_factor_times_steps_over_total_and_sum_to_one(seed):
    rng = np.random.default_rng(seed)
    staleness = rng.integers(0, 6, size=5)
    steps = rng.integers(1, 300, size=5).tolist()
    for name in ("constant", "harmonic", "exponential"):
        factors = [queue_staleness_factor(name, 0.5, int(tau)) for tau in staleness]
        weights = fedqueue_weights(factors, steps)
        assert sum(weights) == pytest.approx(1.0)
        raw = [f * e / sum(steps) for f, e in zip(factors, steps, strict=True)]
        assert weights == pytest.approx([r / sum(raw) for r in raw])
    assert queue_staleness_factor("harmonic", 0.5, 2) == 0.5 and queue_staleness_factor("exponential", 1.0, 1) == (
        pytest.approx(math.exp(-1))
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy.fedqueue-t-sync": 0.0}, "strategy.fedqueue-t-sync = 0.0 must be > 0"),
        ({"strategy.fedqueue-min-steps": 0}, "strategy.fedqueue-min-steps = 0 must be >= 1"),
        ({"strategy.fedqueue-queue-alpha": 0.0}, r"strategy.fedqueue-queue-alpha = 0.0 must be in \(0, 1\]"),
        ({"strategy.fedqueue-safety-margin": -1.0}, "strategy.fedqueue-safety-margin = -1.0"),
        ({"strategy.fedqueue-staleness": "sqrt"}, "use one of constant, harmonic, exponential"),
        ({"strategy.fedqueue-tolerance": -0.1}, "strategy.fedqueue-tolerance"),
    ],
)
def test_bad_fedqueue_settings_are_clear_errors(overrides, message):
    with pytest.raises(ChemFLError, match=message):
        StrategySpec.from_config(resolve({"strategy.name": "fedqueue", **overrides}))


def test_a_recipe_selects_fedqueue_with_the_published_defaults():
    strategy = make_strategy(StrategySpec.from_config(resolve({"strategy.name": "fedqueue"})), lambda *_: None)
    assert isinstance(strategy, FedQueue) and isinstance(strategy.rule, FedQueueRule)
    r = strategy.rule
    assert (r.t_sync, r.q_init, r.queue_alpha, r.compute_alpha, r.safety_margin) == (3600.0, 2.0, 0.5, 0.5, 60.0)
    assert (r.min_steps, r.admission, r.tolerance, r.staleness, r.num_clients) == (20, 0.2, 0.15, "constant", 4)
    assert FedQueue().rule == r  # Flower-style constructor, same defaults
