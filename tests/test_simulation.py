"""`chemfl simulate --set`: typed overrides, checked like a recipe, merged into one file flwr reads."""

import pytest
from flwr.common.config import parse_config_args

from chemfl.errors import ChemFLError
from chemfl.simulation import merged_recipe, parse_overrides

PROJECT_RECIPE = "recipes/four-facilities-emulated.toml"


def test_values_are_typed_like_toml():
    overrides = parse_overrides(
        [
            "strategy.name=walltime-aware",
            "train.lr=0.02",
            "strategy.buffer-size=4",
            "emulation.virtual-time=false",
            'run-name="a b"',
        ]
    )
    assert overrides == {
        "strategy.name": "walltime-aware",
        "train.lr": 0.02,
        "strategy.buffer-size": 4,
        "emulation.virtual-time": False,
        "run-name": "a b",
    }


def test_unknown_keys_wrong_types_and_missing_equals_are_errors():
    with pytest.raises(ChemFLError, match="strategy.nmae"):
        parse_overrides(["strategy.nmae=fedbuff"])
    with pytest.raises(ChemFLError):
        parse_overrides(["train.lr=fast"])
    with pytest.raises(ChemFLError, match="key=value"):
        parse_overrides(["strategy.name"])


def test_the_merged_recipe_is_the_recipe_plus_the_overrides(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / PROJECT_RECIPE
    merged = merged_recipe(recipe, {"strategy.name": "fedasync", "model.system-prompt": 'say "hi"\\n'}, tmp_path)
    original, read_back = parse_config_args([str(recipe)]), parse_config_args([str(merged)])
    assert read_back == {**original, "strategy.name": "fedasync", "model.system-prompt": 'say "hi"\\n'}
