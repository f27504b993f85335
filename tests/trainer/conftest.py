"""Shared by the trainer's tests: a tiny random model and a two-facility offline build (made once
per session), the recipe a trainer is started with, and the reference training in this process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from chemfl.config import resolve
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.simulation import toml_literal
from tests.tiny import save_tiny_llama


@dataclass(frozen=True)
class TrainerSetup:
    config: dict  # the resolved run config
    recipe: Path  # the same knobs as a recipe file
    shard: Path  # the polaris shard


@pytest.fixture(scope="session")
def trainer_setup(tmp_path_factory) -> TrainerSetup:
    folder = tmp_path_factory.mktemp("trainer-setup")
    knobs = {
        "data.path": str(folder / "data"),
        "data.max-molecules": 30,
        "data.facilities": "polaris,aurora",
        "model.name": save_tiny_llama(folder / "model"),
        "model.gguf-file": "",
        "model.cache-dir": str(folder / "cache"),
        "lora.r": 4,
        "lora.alpha": 8,
        "lora.dropout": 0.0,  # dropout masks are per rank: off, so ranks and one process can agree exactly
        "train.local-steps": 3,
        "train.batch-size": 2,
        "train.max-length": 128,
        "train.lr": 0.01,
        "eval.loss-per-task": 2,
    }
    config = resolve(knobs)
    build_dataset(BuildSpec.from_config(config), folder / "data")
    recipe = folder / "recipe.toml"
    recipe.write_text("".join(f"{key} = {toml_literal(value)}\n" for key, value in knobs.items()))
    return TrainerSetup(config, recipe, folder / "data" / "partitions" / "polaris")
