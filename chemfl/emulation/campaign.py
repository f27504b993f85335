"""What an emulated campaign is: per facility, its speed, batch-job walltime, queue waits and
start-up cost; for every task, its overhead and adapter transfer. Plain data plus the queue-wait
draw, which is a pure function of (seed, facility, job index) so a campaign never depends on the
order in which it is asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chemfl.config import Scalar, parse_facility_numbers
from chemfl.errors import ChemFLError
from chemfl.hpc.launch_log import queue_waits

PER_FACILITY_KEYS = (
    "emulation.seconds-per-step",
    "emulation.walltime",
    "emulation.queue-median",
    "emulation.startup-seconds",
)


def parse_per_facility(key: str, setting: str, facilities: tuple[str, ...], minimum: float) -> dict[str, float]:
    """`"polaris=2.0,aurora=3.1"` -> {facility: value}; every facility listed once, nothing else."""
    values = parse_facility_numbers(key, setting, minimum)
    missing, unknown = sorted(set(facilities) - set(values)), sorted(set(values) - set(facilities))
    if missing or unknown:
        raise ChemFLError(
            f"{key} must list every facility of data.facilities ({', '.join(facilities)}) once: "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}")
        )
    return values


@dataclass(frozen=True)
class FacilityModel:
    name: str
    seconds_per_step: float  # virtual seconds per local optimizer step
    walltime: float  # seconds a batch job runs
    queue_median: float  # median seconds a job waits in the queue
    startup_seconds: float  # once per job: environment set-up and model load


@dataclass(frozen=True)
class CampaignSpec:
    name: str
    seed: int
    facilities: tuple[FacilityModel, ...]
    queue_sigma: float  # log-normal shape of queue waits
    spike_probability: float  # chance a job's wait is multiplied by spike_factor
    spike_factor: float
    task_overhead_seconds: float  # every task: ClientApp process start and adapter load
    transfer_mb_per_second: float  # adapter bytes, each way
    trace: dict[str, list[float]] | None = None  # replayed queue waits per facility (cycled)
    queue_ahead: bool = False  # a facility's next job is submitted when its current one starts

    @classmethod
    def from_config(cls, config: dict[str, Scalar], facilities: tuple[str, ...]) -> CampaignSpec:
        per = {key: parse_per_facility(key, str(config[key]), facilities, 0.0) for key in PER_FACILITY_KEYS}
        for name in facilities:
            if per["emulation.seconds-per-step"][name] <= 0 or per["emulation.walltime"][name] <= 0:
                raise ChemFLError(f"{name}: emulation.seconds-per-step and emulation.walltime must be > 0")
        spec = cls(
            name=str(config["emulation.campaign"]) or str(config["run-name"]),
            seed=int(config["emulation.seed"]),
            facilities=tuple(
                FacilityModel(
                    name,
                    per["emulation.seconds-per-step"][name],
                    per["emulation.walltime"][name],
                    per["emulation.queue-median"][name],
                    per["emulation.startup-seconds"][name],
                )
                for name in facilities
            ),
            queue_sigma=float(config["emulation.queue-sigma"]),
            spike_probability=float(config["emulation.spike-probability"]),
            spike_factor=float(config["emulation.spike-factor"]),
            task_overhead_seconds=float(config["emulation.task-overhead-seconds"]),
            transfer_mb_per_second=float(config["emulation.transfer-mb-per-second"]),
            trace=read_trace(Path(str(config["emulation.queue-trace"])), facilities)
            if str(config["emulation.queue-trace"])
            else None,
            queue_ahead=bool(config["emulation.queue-ahead"]),
        )
        if spec.queue_sigma < 0 or not 0 <= spec.spike_probability <= 1 or spec.spike_factor < 1:
            raise ChemFLError(
                "emulation.queue-sigma must be >= 0, emulation.spike-probability in [0, 1] and "
                "emulation.spike-factor >= 1"
            )
        if spec.seed < 0:
            raise ChemFLError(f"emulation.seed = {spec.seed} must be >= 0")
        if spec.task_overhead_seconds < 0 or spec.transfer_mb_per_second <= 0:
            raise ChemFLError("emulation.task-overhead-seconds must be >= 0 and emulation.transfer-mb-per-second > 0")
        return spec

    def facility(self, name: str) -> FacilityModel:
        return next(f for f in self.facilities if f.name == name)

    def queue_wait(self, facility: str, job: int) -> float:
        """Seconds job number `job` (0, 1, ...) of `facility` waits before it starts, counted from its
        submission (with queue-ahead, the start of the job before it: it may start no sooner than that
        job's end)."""
        index = [f.name for f in self.facilities].index(facility)
        if self.trace is not None:
            # Each seed replays the recorded waits in order from its own starting job (cycling).
            waits = self.trace[facility]
            start = int(np.random.default_rng([self.seed, index]).integers(len(waits)))
            return waits[(start + job) % len(waits)]
        rng = np.random.default_rng([self.seed, index, job])
        wait = self.facility(facility).queue_median * math.exp(self.queue_sigma * rng.standard_normal())
        if rng.random() < self.spike_probability:
            wait *= self.spike_factor
        return wait

    def transfer_seconds(self, adapter_bytes: int) -> float:
        """Down and up: the global adapter to the node, its trained adapter back."""
        return 2 * adapter_bytes / (self.transfer_mb_per_second * 1e6)


def read_trace(path: Path, facilities: tuple[str, ...]) -> dict[str, list[float]]:
    """Queue waits per facility from a launcher `launch.jsonl` (started - submitted per job)."""
    if not path.is_file():
        raise ChemFLError(
            f"emulation.queue-trace = {str(path)!r} does not exist; point it at a launch.jsonl "
            "written by `chemfl launch --watch`"
        )
    waits = queue_waits(path)
    missing = [name for name in facilities if not waits.get(name)]
    if missing:
        raise ChemFLError(
            f"emulation.queue-trace {path} has no started job for {', '.join(missing)}; "
            "record a trace that covers every facility of data.facilities"
        )
    return {name: list(waits[name]) for name in facilities}
