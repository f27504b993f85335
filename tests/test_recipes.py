"""Every recipe is valid data: known keys, right types, specs that pass their checks."""

from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from chemfl.config import DEFAULTS, resolve
from chemfl.data_prep.build import BuildSpec
from chemfl.llm.evaluation import EvalSpec
from chemfl.llm.model import LoraSpec, ModelSpec
from chemfl.llm.training import TrainSpec
from chemfl.server_app.strategy_spec import StrategySpec

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.name for path in RECIPES])
def test_recipe_resolves_and_every_spec_accepts_it(recipe):
    config = resolve(parse_config_args([str(recipe)]))
    BuildSpec.from_config(config)
    for spec in (ModelSpec, LoraSpec, TrainSpec, EvalSpec):
        spec.from_config(config)
    StrategySpec.from_config(config)
    assert recipe.read_text().startswith("#"), "a recipe opens with a comment block saying what it is for"


def test_laptop_recipe_is_the_embedded_default():
    laptop = parse_config_args([str(Path(__file__).resolve().parents[1] / "recipes" / "laptop.toml")])
    assert {key: DEFAULTS[key] for key in laptop} == laptop
