"""What rank 0 checks before a task starts, so that a refused task costs nothing: the request's run
config must match what the trainer loaded, and the task must fit the job's walltime left.
No torch: these rules are unit-tested on plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from chemfl.config import Scalar, resolve
from chemfl.errors import ChemFLError

COMPARED_PREFIXES = ("model.", "lora.", "train.")
NOT_COMPARED = frozenset({"model.cache-dir"})  # where a converted copy of the model is kept, not what trains


def check_run_config(loaded: Mapping[str, Scalar], received: Mapping[str, Scalar]) -> None:
    """Refuse a request whose model.*, lora.* or train.* knobs differ from the trainer's: the trainer
    loaded its model, adapter and training settings once, at start, and trains only with those."""
    resolved = resolve(dict(received))
    differing = [
        key
        for key in loaded
        if key.startswith(COMPARED_PREFIXES) and key not in NOT_COMPARED and resolved[key] != loaded[key]
    ]
    if differing:
        shown = ", ".join(f"{key} (trainer {loaded[key]!r}, request {resolved[key]!r})" for key in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ChemFLError(
            f"this request's run config differs from the trainer's in {shown}{more}; the trainer loads its model "
            "and settings once: restart it with the run's recipe (--run-config, --set) or run the recipe it serves"
        )


@dataclass
class StepTimeEstimate:
    """Seconds per optimizer step: an exponential moving average over this trainer's tasks, weight
    `momentum` on the past, so it follows a machine that slows down within a few tasks without
    jumping on one outlier. None before the first task."""

    momentum: float = 0.5
    seconds_per_step: float | None = None

    def observe(self, steps: int, seconds: float) -> None:
        measured = seconds / max(steps, 1)
        if self.seconds_per_step is None:
            self.seconds_per_step = measured
        else:
            self.seconds_per_step = self.momentum * self.seconds_per_step + (1 - self.momentum) * measured

    def check_fits(self, steps: int, walltime_left: float | None) -> None:
        """Refuse a task of `steps` optimizer steps that would not end before the job does. Outside a
        batch job (no walltime) and before the first task (no estimate) nothing is refused."""
        if walltime_left is None or self.seconds_per_step is None:
            return
        needed = steps * self.seconds_per_step
        if needed > walltime_left:
            raise ChemFLError(
                f"this task's {steps} local steps need about {needed:.0f} s at {self.seconds_per_step:.2f} s per step, "
                f"but the batch job has {walltime_left:.0f} s of walltime left; send fewer local-steps (e.g. "
                "strategy.name = walltime-aware) or let the job end and be resubmitted"
            )
