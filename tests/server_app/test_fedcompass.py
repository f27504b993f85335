"""FedCompass (Li et al., ICLR 2024) as a pure rule: speeds, arrival groups, deadlines, mixing."""

from __future__ import annotations

import numpy as np
import pytest

from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.server_app.rules import FedCompassRule, NodeView, TaskOutcome, Update
from chemfl.server_app.strategies import FedCompass, make_strategy
from chemfl.server_app.strategy_spec import StrategySpec
from tests.server_app.rule_defaults import adapter, rule


def fedcompass(**changes) -> FedCompassRule:
    return rule("fedcompass", **{"min_steps": 2, "max_steps": 20, **changes})


class Run:
    """Plays the push/pull loop by hand: dispatches, arrivals, losses, with explicit times."""

    def __init__(self, strategy: FedCompassRule, facilities: dict[int, str]) -> None:
        self.rule, self.facilities = strategy, facilities
        self.params, self.version = adapter(0.0), 0
        self.sent: dict[int, tuple[float, int]] = {}  # node -> (dispatch time, version sent)
        self.plans: dict[int, int] = {}

    def dispatch(self, now: float, *nodes: int) -> dict[int, int]:
        plans = self.rule.plan_dispatch([NodeView(n, self.facilities[n], now) for n in nodes], 0, len(nodes))
        for node, plan in plans.items():
            self.sent[node] = (now, self.version)
            self.plans[node] = plan.local_steps
        return {node: plan.local_steps for node, plan in plans.items()}

    def arrive(self, node: int, now: float, value: float):
        dispatched, version_sent = self.sent.pop(node)
        self.rule.observe(TaskOutcome(node, self.facilities[node], dispatched, now, self.plans[node], 1.0))
        verdict, published = self.rule.submit(
            self.params, self.version, adapter(0.0), Update(node, version_sent, adapter(value), 10, 1.0)
        )
        self._publish(published)
        return verdict, published

    def lose(self, node: int, now: float):
        dispatched, _ = self.sent.pop(node)
        outcome = TaskOutcome(node, self.facilities[node], dispatched, now, self.plans[node], lost=True)
        self.rule.observe(outcome)
        published = self.rule.discard(self.params, outcome)
        self._publish(published)
        return published

    def due(self, now: float):
        published = self.rule.due(self.params, self.version, now)
        self._publish(published)
        return published

    def _publish(self, published) -> None:
        if published is not None:
            self.params, self.version = published, self.version + 1

    def warm_up(self, seconds_per_step: dict[int, float]) -> float:
        """Every node's first task (Q_max steps, no group) at time 0; returns when the last arrived."""
        self.dispatch(0.0, *seconds_per_step)
        finished = 0.0
        for node, speed in sorted(seconds_per_step.items(), key=lambda item: item[1]):
            finished = self.rule.max_steps * speed
            self.arrive(node, finished, float(node))
        return finished


def test_first_tasks_have_q_max_steps_and_are_mixed_in_alone():
    run = Run(fedcompass(num_clients=4), {1: "a", 2: "b"})
    assert run.dispatch(0.0, 1, 2) == {1: 20, 2: 20}
    verdict, published = run.arrive(1, 20.0, 1.0)
    # x <- (1 - a) x + a y, a = alpha s(0) / N = 0.9 / 4
    assert verdict.accepted and published["m.lora_A.weight"][0, 0] == pytest.approx(0.225)
    assert run.rule.speeds["a"] == pytest.approx(1.0)  # (20 s - 0 s) / 20 steps


def test_equal_speeds_get_equal_steps_and_their_group_aggregates_together():
    run = Run(fedcompass(num_clients=3), {1: "a", 2: "b", 3: "c"})
    start = run.warm_up({1: 1.0, 2: 1.0, 3: 1.0})
    before = run.params["m.lora_A.weight"][0, 0]
    assert run.dispatch(start, 1, 2, 3) == {1: 20, 2: 20, 3: 20}
    [group] = run.rule.groups.values()
    assert set(group.pending) == {1, 2, 3} and group.expected == start + 20 and group.latest == start + 30
    assert run.arrive(1, start + 20, 1.0)[1] is None
    assert run.arrive(2, start + 20, 2.0)[1] is None
    assert run.dispatch(start + 20, 1, 2) == {}  # arrived members wait for their group
    _, published = run.arrive(3, start + 20, 3.0)
    # Staleness 0, a_i = 0.9 / 3: x <- 0.1 x + 0.3 (1 + 2 + 3).
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(0.1 * before + 0.3 * 6.0, rel=1e-6)
    assert not run.rule.groups and set(run.dispatch(start + 20, 1, 2, 3)) == {1, 2, 3}


def test_slower_nodes_get_fewer_steps_within_bounds_and_arrive_with_the_group():
    run = Run(fedcompass(min_steps=2, max_steps=20), {1: "fast", 2: "half", 3: "quarter", 4: "crawl"})
    start = run.warm_up({1: 1.0, 2: 2.0, 3: 4.0, 4: 40.0})
    plans = run.dispatch(start, 1, 2, 3, 4)
    assert plans[1] == 20 and plans[2] == 10 and plans[3] == 5  # Q_i = (T_a - now) / S_i
    assert all(2 <= steps <= 20 for steps in plans.values())
    group = run.rule.tasks[1].group
    assert run.rule.tasks[2].group == run.rule.tasks[3].group == group
    expected = run.rule.groups[group].expected
    assert {start + plans[n] * s for n, s in ((1, 1.0), (2, 2.0), (3, 4.0))} == {expected}
    # The crawling node cannot reach that group with Q_min steps: it founds its own, never below Q_min.
    assert run.rule.tasks[4].group != group and plans[4] == 2


def test_speed_is_a_moving_average_with_the_newest_measurement_weighing_the_momentum():
    run = Run(fedcompass(speed_momentum=0.9), {1: "a"})
    start = run.warm_up({1: 1.0})
    steps = run.dispatch(start, 1)[1]
    run.arrive(1, start + steps * 3.0, 1.0)  # measured 3 s per step
    assert run.rule.speeds["a"] == pytest.approx(0.1 * 1.0 + 0.9 * 3.0)


def test_a_group_aggregates_at_its_deadline_without_a_late_member_whose_update_joins_the_next():
    run = Run(fedcompass(num_clients=2), {1: "a", 2: "b"})
    start = run.warm_up({1: 1.0, 2: 1.0})
    run.dispatch(start, 1, 2)
    deadline = start + 30  # expected start + 20, latest-time factor 1.5
    assert run.arrive(1, start + 20, 5.0)[1] is None
    assert run.rule.next_due() == deadline
    assert run.due(deadline - 1) is None
    at_deadline = run.params["m.lora_A.weight"][0, 0]
    published = run.due(deadline)
    assert published is not None
    assert published["m.lora_A.weight"][0, 0] == pytest.approx((1 - 0.45) * at_deadline + 0.45 * 5.0, rel=1e-6)
    assert run.dispatch(deadline, 1) == {1: 20}  # released: node 1 works again, in a group of its own
    # Node 2 arrives late: nothing is published, its update waits for the next group aggregation.
    verdict, late = run.arrive(2, deadline + 10, 7.0)
    assert verdict.accepted and late is None and set(run.rule.late) == {2}
    before = run.params["m.lora_A.weight"][0, 0]
    _, published = run.arrive(1, deadline + 20, 9.0)  # node 1's group is complete: node 2's update joins it
    stale = 0.45 / np.sqrt(2)  # node 2 trained on the version before the deadline's: s(1) = 1 / sqrt(2)
    expected = (1 - 0.45 - stale) * before + 0.45 * 9.0 + stale * 7.0
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(expected, rel=1e-6)
    assert not run.rule.late


def test_a_passed_deadline_is_handled_at_the_next_arrival_when_the_loop_does_not_call_due():
    run = Run(fedcompass(num_clients=2), {1: "a", 2: "b"})
    start = run.warm_up({1: 1.0, 2: 1.0})
    run.dispatch(start, 1, 2)
    run.arrive(1, start + 20, 5.0)
    before = run.params["m.lora_A.weight"][0, 0]
    verdict, published = run.arrive(2, start + 40, 7.0)  # after the deadline (start + 30)
    assert verdict.accepted and 2 in run.rule.late
    assert published["m.lora_A.weight"][0, 0] == pytest.approx(0.55 * before + 0.45 * 5.0, rel=1e-6)


def test_a_lost_member_leaves_its_group_which_then_aggregates_with_the_rest():
    run = Run(fedcompass(num_clients=2), {1: "a", 2: "b"})
    start = run.warm_up({1: 1.0, 2: 1.0})
    run.dispatch(start, 1, 2)
    assert run.arrive(1, start + 20, 5.0)[1] is None
    assert run.lose(2, start + 21) is not None  # node 2 cannot arrive: node 1 does not wait for it
    assert not run.rule.groups
    assert run.dispatch(start + 21, 1) != {}


def test_updates_past_max_staleness_are_dropped_and_leave_the_group():
    run = Run(fedcompass(max_staleness=0), {1: "a", 2: "b"})
    start = run.warm_up({1: 1.0, 2: 1.0})
    run.dispatch(start, 1, 2)
    run.version += 1  # someone else published in between
    verdict, _ = run.arrive(1, start + 20, 5.0)
    assert (
        not verdict.accepted and verdict.reason == "stale" and 1 not in run.rule.groups[run.rule.tasks[2].group].pending
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy.fedcompass-min-steps": 0}, "1 <= strategy.fedcompass-min-steps"),
        ({"strategy.fedcompass-min-steps": 300}, "strategy.fedcompass-max-steps"),
        ({"strategy.fedcompass-speed-momentum": 0.0}, "strategy.fedcompass-speed-momentum = 0.0"),
        ({"strategy.fedcompass-latest-time-factor": 0.5}, "strategy.fedcompass-latest-time-factor = 0.5 must be >= 1"),
        ({"strategy.fedcompass-alpha": 1.5}, "strategy.fedcompass-alpha = 1.5"),
    ],
)
def test_bad_fedcompass_settings_are_clear_errors(overrides, message):
    with pytest.raises(ChemFLError, match=message):
        StrategySpec.from_config(resolve({"strategy.name": "fedcompass", **overrides}))


def test_a_recipe_selects_fedcompass_with_the_published_defaults():
    strategy = make_strategy(StrategySpec.from_config(resolve({"strategy.name": "fedcompass"})), lambda *_: None)
    assert isinstance(strategy, FedCompass) and isinstance(strategy.rule, FedCompassRule)
    published = (strategy.rule.min_steps, strategy.rule.max_steps, strategy.rule.speed_momentum)
    assert published == (40, 200, 0.9) and strategy.rule.latest_time_factor == 1.5 and strategy.rule.alpha == 0.9
    assert strategy.rule.staleness.name == "sqrt" and strategy.rule.num_clients == 4  # polynomial a = 0.5
    assert FedCompass().rule == strategy.rule  # Flower-style constructor, same defaults
