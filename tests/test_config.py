"""pyproject.toml's [tool.flwr.app.config] and chemfl.config.DEFAULTS are one table; resolve() checks input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from chemfl.config import DEFAULTS, resolve, split_list
from chemfl.errors import ChemFLError

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def app_config() -> dict:
    with PYPROJECT.open("rb") as handle:
        return flatten_dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def test_pyproject_app_config_equals_defaults_exactly():
    config = app_config()
    assert sorted(config) == sorted(DEFAULTS)
    for key, value in config.items():
        assert value == DEFAULTS[key], key
        # 4000 == 4000.0 and 1 == True in Python: the types must agree as well.
        assert type(value) is type(DEFAULTS[key]), key


def test_resolve_without_overrides_is_the_defaults_and_a_copy():
    resolved = resolve({})
    assert resolved == DEFAULTS
    resolved["data.seed"] = 7
    assert DEFAULTS["data.seed"] == 42


def test_resolve_applies_overrides():
    resolved = resolve({"data.seed": 7, "data.source": "files", "data.dirichlet-alpha": 0.1})
    assert resolved["data.seed"] == 7
    assert resolved["data.source"] == "files"
    assert resolved["data.dirichlet-alpha"] == 0.1
    assert resolved["data.max-molecules"] == DEFAULTS["data.max-molecules"]


def test_resolve_accepts_an_int_for_a_float_knob_and_makes_it_a_float():
    resolved = resolve({"data.dirichlet-alpha": 2})
    assert resolved["data.dirichlet-alpha"] == 2.0
    assert type(resolved["data.dirichlet-alpha"]) is float


@pytest.mark.parametrize("key", ["data.max_molecules", "data.molecules", "seed", "nosuch.section-key"])
def test_resolve_rejects_unknown_keys(key):
    with pytest.raises(ChemFLError, match="unknown config key") as error:
        resolve({key: 1})
    assert key in str(error.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("data.seed", "42"),  # a string for an int
        ("data.seed", 4.0),  # a float for an int
        ("data.max-molecules", True),  # bool is an int subclass, but not an int knob's value
        ("data.dirichlet-alpha", "0.5"),  # a string for a float
        ("data.dirichlet-alpha", False),
        ("data.source", 3),  # an int for a string
        ("data.tasks", None),
        ("run-name", 1.5),
    ],
)
def test_resolve_rejects_wrong_types(key, value):
    with pytest.raises(ChemFLError) as error:
        resolve({key: value})
    assert key in str(error.value)


WRONG_VALUES = {
    bool: ["true", 1, 0.0, None],
    int: ["1", 1.0, True, None],
    float: ["0.5", True, None],
    str: [1, 0.5, False, None],
}


@pytest.mark.parametrize("key", sorted(DEFAULTS))
def test_every_knob_takes_its_own_type_and_refuses_others(key):
    default = DEFAULTS[key]
    assert resolve({key: default})[key] == default
    for value in WRONG_VALUES[type(default)]:
        with pytest.raises(ChemFLError, match="should be a") as error:
            resolve({key: value})
        assert key in str(error.value)


def test_split_list_drops_blanks_and_spaces():
    assert split_list("a, b,,c ,") == ["a", "b", "c"]
    assert split_list("") == []
