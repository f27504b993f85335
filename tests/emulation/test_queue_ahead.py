"""`emulation.queue-ahead`: a facility's next job is submitted when its current one starts, as the
launcher's `queue-ahead = true` does, so its queue wait runs while the current job does."""

from __future__ import annotations

import pytest

from tests.emulation.real_grid import FACILITIES
from tests.emulation.test_campaign import campaign, run_campaign
from tests.server_app.rule_defaults import fedasync

pytestmark = pytest.mark.usefixtures("server_task_identity")


def jobs(lines: list[dict], facility: str) -> dict[int, dict[str, float]]:
    """{job number: {state: time}} of one facility's job lines (campaign-end lines left out)."""
    table: dict[int, dict[str, float]] = {}
    for line in lines:
        if line["event"] == "job" and line["facility"] == facility and not line["reason"]:
            table.setdefault(line["job"], {})[line["state"]] = line["time"]
    return table


def offline_gaps(lines: list[dict], facility: str) -> list[float]:
    """Seconds between one job's end and the next one's start: the facility has no SuperNode."""
    table = jobs(lines, facility)
    return [
        table[k + 1]["running"] - table[k]["ended"]
        for k in sorted(table)
        if "ended" in table[k] and "running" in table.get(k + 1, {})
    ]


def running_intervals(lines: list[dict], facility: str) -> list[tuple[float, float]]:
    table = jobs(lines, facility)
    return [(job["running"], job.get("ended", float("inf"))) for _, job in sorted(table.items()) if "running" in job]


def test_queue_ahead_shortens_the_offline_gaps_and_never_runs_two_jobs_at_once():
    # Frontier: 2-hour jobs behind a 30-minute median queue; the spikes make some waits 4 hours.
    calm, ahead = (
        campaign(seed=5, spike_probability=0.3, spike_factor=8.0, queue_ahead=queue_ahead)
        for queue_ahead in (False, True)
    )
    before, _, _ = run_campaign(calm, fedasync(), hours=24)
    after, _, _ = run_campaign(ahead, fedasync(), hours=24)
    for facility in FACILITIES:
        intervals = running_intervals(after, facility)
        assert len(intervals) >= 3
        # One job at a time: each starts at or after the end of the one before.
        assert all(end <= start for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False))
        # Each job after the first is submitted the moment the one before it starts.
        table = jobs(after, facility)
        assert all(table[k + 1]["queued"] == table[k]["running"] for k in sorted(table) if "running" in table[k])
    gaps_before, gaps_after = offline_gaps(before, "frontier"), offline_gaps(after, "frontier")
    assert sum(gaps_after) / len(gaps_after) < 0.5 * sum(gaps_before) / len(gaps_before)
    assert gaps_after.count(0.0) > len(gaps_after) / 2  # most jobs start as the previous one ends
    assert len(running_intervals(after, "frontier")) > len(running_intervals(before, "frontier"))

    def online_hours(lines: list[dict]) -> float:
        return (
            sum(min(end, 24 * 3600) - start for name in FACILITIES for start, end in running_intervals(lines, name))
            / 3600
        )

    assert online_hours(after) > online_hours(before) + 10  # of 4 x 24 facility-hours


def test_a_wait_longer_than_the_walltime_still_leaves_a_gap_of_the_difference():
    # Fixed waits (sigma 0): 90-minute waits behind 30-minute jobs.
    spec = campaign(
        queue_ahead=True,
        queue_sigma=0.0,
        walltime="polaris=3600,aurora=3600,frontier=7200,perlmutter=1800",
        queue_median="polaris=600,aurora=900,frontier=1800,perlmutter=5400",
    )
    lines, _, _ = run_campaign(spec, fedasync(), hours=12)
    assert set(offline_gaps(lines, "perlmutter")) == {5400.0 - 1800.0}  # without queue-ahead: 5400
    assert set(offline_gaps(lines, "polaris")) == {0.0}
    first = jobs(lines, "perlmutter")[0]
    assert first["running"] == 5400.0  # the first job is submitted at the start, as before


def test_queue_ahead_campaigns_are_deterministic_and_close_their_books():
    spec = campaign(queue_ahead=True, seed=2)
    once, _, _ = run_campaign(spec, fedasync(), hours=6, order_seed=1)
    again, _, _ = run_campaign(spec, fedasync(), hours=6, order_seed=2)
    strip = ("server_seconds", "evaluation_seconds")
    assert [{k: v for k, v in line.items() if k not in strip} for line in once] == [
        {k: v for k, v in line.items() if k not in strip} for line in again
    ]
    # At the end every facility's open jobs are closed: the running one, and the one queued behind it.
    for name in FACILITIES:
        closing = {
            line["job"]: line["reason"]
            for line in once
            if line["event"] == "job" and line["facility"] == name and (line["reason"] or "").startswith("campaign end")
        }
        open_jobs = [number for number, states in jobs(once, name).items() if "ended" not in states]
        assert sorted(closing) == open_jobs and list(closing.values()).count("campaign end (still queued)") == 1
    times = [line.get("time", line.get("arrival_time")) for line in once if line["event"] in ("update", "lost", "job")]
    assert times == sorted(times)
