"""Virtual-time campaigns: the clock, determinism, walltime losses, queue waits and their replay,
and the strategies that run in them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chemfl.config import resolve
from chemfl.emulation.campaign import CampaignSpec
from chemfl.emulation.grid import EmulatedGrid
from chemfl.errors import ChemFLError
from chemfl.server_app.async_loop import AsyncRun
from chemfl.server_app.checkpoint import AsyncState
from tests.emulation.real_grid import FACILITIES, ShuffledGrid
from tests.server_app.rule_defaults import fedasync, fedavg_rounds, fedbuff, settings, walltime_aware

pytestmark = pytest.mark.usefixtures("server_task_identity")

CAMPAIGN = {
    "emulation.seconds-per-step": "polaris=60,aurora=90,frontier=75,perlmutter=60",
    "emulation.walltime": "polaris=3600,aurora=3600,frontier=7200,perlmutter=1800",
    "emulation.queue-median": "polaris=600,aurora=900,frontier=1800,perlmutter=300",
    "emulation.startup-seconds": "polaris=120,aurora=180,frontier=150,perlmutter=120",
    "emulation.queue-sigma": 0.75,
    "emulation.task-overhead-seconds": 30.0,
}


def campaign(**changes) -> CampaignSpec:
    values = {**CAMPAIGN, **{"emulation." + k.replace("_", "-"): v for k, v in changes.items()}}
    return CampaignSpec.from_config(resolve(values), FACILITIES)


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "m.lora_B.weight": np.zeros((4, 2), dtype=np.float32),
    }


def run_campaign(
    spec: CampaignSpec, strategy, order_seed: int = 0, hours: float = 12.0, steps: int = 5, facilities=FACILITIES
):
    real = ShuffledGrid(order_seed, facilities)
    lines: list[dict] = []
    grid = EmulatedGrid(
        real, spec, {name: 100 + i for i, name in enumerate(facilities)}, steps, lines.append, poll_seconds=0.0
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
        facility_of={grid.node_id(name): name for name in facilities},
    )
    params = run.run()
    grid.finish()
    real.dispatched = run.state.task_counter
    return lines, params, real


def deterministic(lines: list[dict]) -> list[dict]:
    """Metrics lines without the real-time measurements (server and evaluation seconds)."""
    return [{k: v for k, v in line.items() if k not in ("server_seconds", "evaluation_seconds")} for line in lines]


def test_completions_are_processed_in_virtual_time_order_whatever_the_real_order():
    first, params_first, _ = run_campaign(campaign(), fedbuff(buffer_size=3), order_seed=1)
    second, params_second, _ = run_campaign(campaign(), fedbuff(buffer_size=3), order_seed=2)
    assert deterministic(first) == deterministic(second)
    assert all(np.array_equal(params_first[k], params_second[k]) for k in params_first)
    arrivals = [line["arrival_time"] for line in first if line["event"] == "update"]
    assert len(arrivals) > 20 and arrivals == sorted(arrivals)
    times = [
        line.get("time", line.get("arrival_time", line.get("wall_time")))
        for line in first
        if line["event"] in ("update", "lost", "job")
    ]
    assert times == sorted(times)


def test_same_seed_same_campaign_other_seed_other_queue_waits():
    once, _, _ = run_campaign(campaign(seed=3), fedasync(), hours=6)
    again, _, _ = run_campaign(campaign(seed=3), fedasync(), hours=6)
    other, _, _ = run_campaign(campaign(seed=4), fedasync(), hours=6)
    assert deterministic(once) == deterministic(again)

    def starts(lines):
        return [
            (line["facility"], line["time"]) for line in lines if line["event"] == "job" and line["state"] == "running"
        ]

    assert starts(once) != starts(other)


def test_walltime_end_loses_exactly_the_work_in_flight_and_it_is_never_trained():
    # One facility, 100 s jobs, tasks of 2 x 30 s: the first finishes at 60 s, the second would at 120 s.
    spec = CampaignSpec.from_config(
        resolve(
            {
                "emulation.seconds-per-step": "solo=30",
                "emulation.walltime": "solo=100",
                "emulation.queue-median": "solo=50",
                "emulation.startup-seconds": "solo=0",
                "emulation.queue-sigma": 0.0,
            }
        ),
        ("solo",),
    )
    lines, _, real = run_campaign(spec, fedasync(), hours=0.1, steps=2, facilities=("solo",))
    jobs = [line for line in lines if line["event"] == "job"]
    assert [(line["state"], line["time"]) for line in jobs[:4]] == [
        ("queued", 0.0),
        ("running", 50.0),
        ("ended", 150.0),
        ("queued", 150.0),
    ]
    updates = [line for line in lines if line["event"] == "update"]
    lost = [line for line in lines if line["event"] == "lost"]
    assert [u["arrival_time"] for u in updates][:1] == [pytest.approx(110.0)]
    assert lost[0]["time"] == 150.0 and lost[0]["dispatch_time"] == pytest.approx(110.0)
    assert lost[0]["reason"].startswith("walltime") and lost[0]["facility"] == "solo"
    # Each job: one task delivered, one lost; a lost task never reaches a real SuperNode.
    assert len(lost) >= 2 and len(real.pushed) == real.dispatched - len(lost)
    assert all(
        line["dispatch_time"] + 60
        > next(j["time"] for j in jobs if j["state"] == "ended" and j["time"] >= line["time"])
        for line in lost
    )


def test_replayed_trace_reproduces_its_queue_waits(tmp_path):
    trace = tmp_path / "launch.jsonl"
    events = []
    for facility, waits in {
        "polaris": [120.0, 900.0],
        "aurora": [30.0],
        "frontier": [5.0, 6.0, 7.0],
        "perlmutter": [60.0],
    }.items():
        clock = 1_700_000_000.0
        for attempt, wait in enumerate(waits):
            job = f"{facility}-{attempt}"
            events += [
                {
                    "time": clock,
                    "event": "submitted" if attempt == 0 else "resubmitted",
                    "facility": facility,
                    "backend": "slurm",
                    "job_id": job,
                    "attempt": attempt,
                },
                {
                    "time": clock + wait,
                    "event": "started",
                    "facility": facility,
                    "backend": "slurm",
                    "job_id": job,
                    "attempt": attempt,
                    "queue_wait_seconds": wait,
                },
                {
                    "time": clock + wait + 3600,
                    "event": "ended",
                    "facility": facility,
                    "backend": "slurm",
                    "job_id": job,
                    "attempt": attempt,
                    "ran_seconds": 3600.0,
                },
            ]
            clock += wait + 3600
    trace.write_text("".join(json.dumps(e) + "\n" for e in events))
    spec = campaign(queue_trace=str(trace))
    # The recorded waits in order, cycled, from a starting job the seed picks per facility.
    frontier = [spec.queue_wait("frontier", k) for k in range(4)]
    assert frontier in ([5.0, 6.0, 7.0, 5.0], [6.0, 7.0, 5.0, 6.0], [7.0, 5.0, 6.0, 7.0])
    assert [spec.queue_wait("polaris", k) for k in range(3)] in ([120.0, 900.0, 120.0], [900.0, 120.0, 900.0])
    starting_jobs = {
        tuple(campaign(queue_trace=str(trace), seed=seed).queue_wait("frontier", k) for k in range(3))
        for seed in range(6)
    }
    assert len(starting_jobs) > 1  # seeds replay the trace from different points
    lines, _, _ = run_campaign(spec, fedbuff(buffer_size=2), hours=3)
    starts = [
        line["time"]
        for line in lines
        if line["event"] == "job" and line["state"] == "running" and line["facility"] == "frontier"
    ]
    assert starts[:2] == [frontier[0], frontier[0] + 7200 + frontier[1]]


def test_walltime_aware_never_loses_work_and_skips_what_cannot_finish():
    lines, _, _ = run_campaign(campaign(), walltime_aware(base_steps=5, min_steps=2, max_steps=15), hours=12)
    assert not [line for line in lines if line["event"] == "lost"]
    baseline, _, _ = run_campaign(campaign(), fedasync(), hours=12)
    assert [line for line in baseline if line["event"] == "lost"]  # the same campaign does lose work without planning
    updates = [line for line in lines if line["event"] == "update"]
    assert {line["steps"] for line in updates} - {5}  # tasks were sized, not all default


def test_walltime_aware_plan_fits_the_reported_walltime():
    strategy = walltime_aware(base_steps=5, min_steps=2, max_steps=15, margin_seconds=30)
    from chemfl.server_app.rules import TaskOutcome

    assert strategy.plan_steps("polaris", 0.0) == 5  # nothing known yet: the default task
    strategy.observe(TaskOutcome(1, "polaris", 0.0, 400.0, steps=5, train_seconds=300.0, walltime_remaining=1000.0))
    assert strategy.estimates["polaris"].job_end == 1400.0
    # 1400 - 400 - 100 s overhead - 30 s margin = 870 s: 14 steps fit; after 5 the tail (9) is another task.
    assert strategy.plan_steps("polaris", 400.0) == 5
    # 1400 - 1000 - 130 = 270 s: 4 steps fit; a task of 4 leaves no room for another, so it takes them all.
    assert strategy.plan_steps("polaris", 1000.0) == 4
    # 1400 - 1250 - 130 < 2 steps: nothing is sent.
    assert strategy.plan_steps("polaris", 1250.0) is None
    # After the job's end the facility is in a new job, as long as its last one (1400 s): the default again.
    assert strategy.plan_steps("polaris", 2000.0) == 5
    assert strategy.estimates["polaris"].job_end == 2000.0 + 1400.0


def test_fedavg_rounds_wait_for_every_dispatched_node_and_average_by_examples():
    lines, _, _ = run_campaign(campaign(), fedavg_rounds(min_nodes=1), hours=8)
    updates = [line for line in lines if line["event"] in ("update", "lost")]
    assert all(line.get("staleness", 0) == 0 for line in updates)
    # A round's tasks all start from the version it published, and no task is sent mid-round.
    dispatches = sorted({(line["dispatch_time"], line["version_sent"]) for line in updates})
    versions = [v for _, v in dispatches]
    assert versions == sorted(versions)


def test_campaign_settings_are_checked():
    with pytest.raises(ChemFLError, match="must list every facility.*missing perlmutter"):
        campaign(walltime="polaris=3600,aurora=3600,frontier=7200")
    with pytest.raises(ChemFLError, match="facility=number"):
        campaign(walltime="polaris=1h,aurora=3600,frontier=7200,perlmutter=1800")
    with pytest.raises(ChemFLError, match="spike-probability"):
        campaign(spike_probability=2.0)
    with pytest.raises(ChemFLError, match="does not exist"):
        campaign(queue_trace="/nonexistent/launch.jsonl")


def test_queue_spikes_lengthen_some_waits():
    calm, spiky = campaign(), campaign(spike_probability=0.5, spike_factor=10.0)
    calm_waits = [calm.queue_wait("polaris", k) for k in range(200)]
    spiky_waits = [spiky.queue_wait("polaris", k) for k in range(200)]
    ratios = np.array(spiky_waits) / np.array(calm_waits)
    assert set(np.round(ratios, 6)) == {1.0, 10.0} and 0.35 < np.mean(ratios > 1) < 0.65
