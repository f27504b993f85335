"""FedCompass and FedQueue through the emulated four-facility campaign (virtual time, batch jobs,
queue waits, walltimes), with and without the emulated clock stopping at the rule's next deadline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chemfl.emulation.grid import EmulatedGrid
from chemfl.server_app.async_loop import AsyncRun
from chemfl.server_app.checkpoint import AsyncState
from tests.emulation.real_grid import FACILITIES, ShuffledGrid
from tests.emulation.test_campaign import campaign, deterministic, initial_params
from tests.server_app.rule_defaults import rule, settings

pytestmark = pytest.mark.usefixtures("server_task_identity")

SECONDS_PER_STEP = {"polaris": 60, "aurora": 90, "frontier": 75, "perlmutter": 60}  # test_campaign's CAMPAIGN


def run_campaign(strategy, hours: float = 12.0, order_seed: int = 0, on_time: bool = False, spec=None) -> list[dict]:
    real = ShuffledGrid(order_seed, FACILITIES)
    lines: list[dict] = []
    grid = EmulatedGrid(
        real,
        spec or campaign(),
        {name: 100 + i for i, name in enumerate(FACILITIES)},
        5,
        lines.append,
        poll_seconds=0.0,
        alarm=strategy.next_due if on_time else None,
    )
    run = AsyncRun(
        grid,
        strategy,
        AsyncState(params=initial_params()),
        settings(eval_every=1, num_versions=10_000, max_seconds=hours * 3600),
        evaluate=lambda version, params: float(np.mean([np.abs(v).mean() for v in params.values()])),
        record=lines.append,
        clock=grid.clock,
        sleep=grid.sleep,
        facility_of={grid.node_id(name): name for name in FACILITIES},
    )
    run.run()
    grid.finish()
    return lines


def of(lines: list[dict], event: str) -> list[dict]:
    return [line for line in lines if line["event"] == event]


def published_between_arrivals(lines: list[dict]) -> list[dict]:
    """Versions published at a time when nothing arrived or was lost: on a deadline."""
    arrivals = {line["arrival_time"] for line in of(lines, "update")} | {line["time"] for line in of(lines, "lost")}
    return [line for line in of(lines, "version") if line["version"] > 0 and line["wall_time"] not in arrivals]


def fedcompass(**changes):
    return rule("fedcompass", **{"min_steps": 2, "max_steps": 15, **changes})


def fedqueue():
    return rule("fedqueue", t_sync=1200.0, min_steps=2)


def test_fedcompass_campaign_sizes_tasks_within_bounds_and_is_deterministic():
    lines = run_campaign(fedcompass())
    updates = of(lines, "update")
    assert len(of(lines, "version")) > 20 and all(line["accepted"] for line in updates)
    assert {line["steps"] for line in updates} <= set(range(2, 16)) and len({line["steps"] for line in updates}) > 2
    again = run_campaign(fedcompass(), order_seed=1)  # the laptop returns replies in another order
    assert deterministic(lines) == deterministic(again)


def test_fedcompass_groups_aggregate_at_their_deadlines_when_the_clock_stops_there():
    # A 10-minute start-up in every job makes a job's first task arrive late for its group.
    slow_start = campaign(startup_seconds=",".join(f"{name}=600" for name in FACILITIES))
    lines = run_campaign(fedcompass(latest_time_factor=1.2), on_time=True, spec=slow_start)
    assert published_between_arrivals(lines)  # some groups closed on their deadline, not on an arrival


def test_fedqueue_campaign_budgets_work_from_the_predicted_queue_wait():
    strategy = fedqueue()
    lines = run_campaign(strategy)
    updates = of(lines, "update")
    assert len(of(lines, "version")) > 5 and all(line["accepted"] for line in updates)
    first = {}
    for line in updates:
        first.setdefault(line["facility"], line)
    assert {line["steps"] for line in first.values()} == {2}  # warm-up tasks
    for line in updates:  # J = 1200 - q_hat - 60 s at most: floor(J / s) steps, at least 2
        assert 2 <= line["steps"] <= max(2, math.floor((1200 - 60) / SECONDS_PER_STEP[line["facility"]]))
    assert set(strategy.queue_wait) == set(FACILITIES) and set(strategy.step_seconds) == set(FACILITIES)
    again = run_campaign(fedqueue(), order_seed=1)
    assert deterministic(lines) == deterministic(again)


def test_fedqueue_rounds_are_forced_on_time():
    lines = run_campaign(fedqueue(), on_time=True)
    forced = published_between_arrivals(lines)
    assert forced and len(of(lines, "version")) > 5
