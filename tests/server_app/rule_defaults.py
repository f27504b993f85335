"""Rules and loop settings for tests: pyproject's defaults (through the run config) with the
changes a test names, so tests state only what they vary."""

from __future__ import annotations

import dataclasses

import numpy as np

from chemfl.config import resolve
from chemfl.server_app.async_loop import LoopSettings
from chemfl.server_app.strategy_spec import StrategySpec


def rule(name: str, **changes):
    return dataclasses.replace(StrategySpec.from_config(resolve({"strategy.name": name})).rule(), **changes)


def fedbuff(**changes):
    return rule("fedbuff", **changes)


def fedasync(**changes):
    return rule("fedasync", **changes)


def walltime_aware(**changes):
    return rule("walltime-aware", **changes)


def fedavg_rounds(**changes):
    return dataclasses.replace(
        StrategySpec.from_config(resolve({"strategy.name": "fedavg", "emulation.virtual-time": True})).rule(),
        **changes,
    )


def settings(**changes) -> LoopSettings:
    spec = StrategySpec.from_config(resolve({}))
    defaults = LoopSettings(
        num_versions=spec.num_versions,
        max_seconds=spec.max_seconds,
        target_loss=spec.target_loss,
        concurrency=spec.concurrency,
        message_ttl=spec.message_ttl,
        max_update_norm=spec.max_update_norm,
        eval_every=spec.eval_every,
    )
    return dataclasses.replace(defaults, **changes)


def adapter(value: float) -> dict[str, np.ndarray]:
    """A two-tensor stand-in adapter, every entry `value`."""
    return {
        "m.lora_A.weight": np.full((2, 3), value, np.float32),
        "m.lora_B.weight": np.full((4, 2), value, np.float32),
    }
