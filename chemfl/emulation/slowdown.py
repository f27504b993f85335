"""`emulation.slowdown`: a facility sleeps so that it takes `factor` times its real training time
(real-time heterogeneity for `chemfl simulate`; virtual-time campaigns live in `campaign` and `grid`)."""

from __future__ import annotations

import time

from chemfl.config import split_list
from chemfl.errors import ChemFLError


def parse_slowdown(setting: str) -> dict[str, float]:
    """`emulation.slowdown = "facility=factor,..."` -> {facility: factor}, every factor >= 1."""
    factors = {}
    for item in split_list(setting):
        name, _, factor = item.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not name.strip() or value < 1.0:
            raise ChemFLError(f"emulation.slowdown entry {item!r} must be 'facility=factor' with factor >= 1, "
                              "e.g. \"polaris=4\"")
        factors[name.strip()] = value
    return factors


def emulate_slowdown(setting: str, facility: str, train_seconds: float) -> float:
    """Sleep so that this facility takes `factor` times its real training time; returns the sleep."""
    extra = (parse_slowdown(setting).get(facility, 1.0) - 1.0) * train_seconds
    if extra > 0:
        time.sleep(extra)
    return extra
