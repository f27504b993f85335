"""Run configuration: the defaults of `[tool.flwr.app.config]` and their validation.

pyproject.toml is where users read and edit every knob; DEFAULTS mirrors it for the `chemfl`
command, which runs without the Flower App around it. tests/test_config.py keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from chemfl.errors import ChemFLError

Scalar = Union[str, int, float, bool]

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
    raise ChemFLError(
        f"config key '{key}' = {value!r} should be a {type(default).__name__} "
        f"(default {default!r})"
    )


def split_list(value: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: how list-valued knobs are written in TOML strings."""
    return [item.strip() for item in value.split(",") if item.strip()]
