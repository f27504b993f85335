"""Write the queue-wait trace that recipes/four-facilities-trace.toml replays.

    python bench/queue_trace.py [--out recipes/four-facilities/queue-trace.jsonl] [--jobs 60] [--seed 11]

The file is a launcher log (launch.jsonl: submitted / started / ended per job, PBS or Slurm as
each site uses) of back-to-back jobs per facility, so `emulation.queue-trace` reads it exactly as it
reads a trace recorded by `chemfl launch --watch`. The waits are SYNTHETIC, not measured at the
sites: what they model, and what the log-normal draw of the calm and spikes campaigns cannot, is
that real queue waits come in correlated stretches. Each facility switches between a normal
regime (waits log-normal around its median, sigma 0.5) and a congested one (a reservation, a
full-machine run, a drain before maintenance: 4x the median), which starts with probability 0.08
per job and lasts 2-5 jobs; Frontier and Perlmutter also see a short backlog every 10th job (2x).
Record your own launch.jsonl over a week and point the recipe at it instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
# facility: (backend, median queue wait s, walltime s), as in the four-facility campaign recipes
FACILITIES = {
    "polaris": ("pbs", 3600.0, 21600.0),
    "aurora": ("pbs", 7200.0, 10800.0),
    "frontier": ("slurm", 2700.0, 7200.0),
    "perlmutter": ("slurm", 1200.0, 3600.0),
}
CONGESTED_FACTOR, CONGESTION_START, CONGESTION_JOBS = 4.0, 0.08, (2, 5)


def waits(facility_index: int, median: float, jobs: int, seed: int, backlog_every: int | None) -> list[float]:
    rng = np.random.default_rng([seed, facility_index])
    congested_left, result = 0, []
    for job in range(jobs):
        if congested_left == 0 and rng.random() < CONGESTION_START:
            congested_left = int(rng.integers(CONGESTION_JOBS[0], CONGESTION_JOBS[1] + 1))
        factor = CONGESTED_FACTOR if congested_left else 1.0
        congested_left = max(0, congested_left - 1)
        if backlog_every and job % backlog_every == backlog_every - 1:
            factor *= 2.0
        result.append(round(median * factor * float(np.exp(0.5 * rng.standard_normal())), 1))
    return result


def events(jobs: int, seed: int) -> list[dict]:
    lines = []
    for index, (facility, (backend, median, walltime)) in enumerate(FACILITIES.items()):
        backlog = 10 if backend == "slurm" else None
        clock = 1.8e9  # any epoch: only differences count
        for attempt, wait in enumerate(waits(index, median, jobs, seed, backlog)):
            job_id = f"{facility}-{attempt}"
            common = {"facility": facility, "backend": backend, "job_id": job_id, "attempt": attempt}
            lines.append({"time": clock, "event": "submitted" if attempt == 0 else "resubmitted", **common})
            lines.append({"time": clock + wait, "event": "started", "queue_wait_seconds": wait, **common})
            clock += wait + walltime
            lines.append({"time": clock, "event": "ended", "ran_seconds": walltime, **common})
    return sorted(lines, key=lambda line: line["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT / "recipes" / "four-facilities" / "queue-trace.jsonl")
    parser.add_argument("--jobs", type=int, default=60, help="jobs per facility (the replay cycles through them)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text("".join(json.dumps(line) + "\n" for line in events(args.jobs, args.seed)), encoding="utf-8")
    temporary.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
