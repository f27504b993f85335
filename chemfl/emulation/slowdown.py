"""`emulation.slowdown`: a facility sleeps so that it takes `factor` times its real training time
(real-time heterogeneity for `chemfl simulate`; virtual-time campaigns live in `campaign` and `grid`)."""

from __future__ import annotations

import time

from chemfl.config import parse_facility_numbers


def parse_slowdown(setting: str) -> dict[str, float]:
    """`emulation.slowdown = "facility=factor,..."` -> {facility: factor}, every factor >= 1."""
    return parse_facility_numbers("emulation.slowdown", setting, 1.0)


def emulate_slowdown(setting: str, facility: str, train_seconds: float) -> float:
    """Sleep so that this facility takes `factor` times its real training time; returns the sleep."""
    extra = (parse_slowdown(setting).get(facility, 1.0) - 1.0) * train_seconds
    if extra > 0:
        time.sleep(extra)
    return extra
