"""`chemfl simulate`: typed `--set` overrides merged into one file flwr reads; bad recipes, failed runs,
a dead SuperLink and two simulations in one folder."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import tomli_w
from flwr.common.config import parse_config_args

from chemfl.cli import main
from chemfl.errors import ChemFLError
from chemfl.simulation import merged_recipe, parse_overrides, simulate, superlink_pids
from tests.tiny import save_tiny_llama

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


# --- runs that fail say so ------------------------------------------------------------------------

PROJECT = Path(__file__).resolve().parents[1]


def tiny_recipe(tmp_path, name: str, **changes) -> Path:
    config = {
        "run-name": name,
        "data.path": str(tmp_path / "data"),
        "data.max-molecules": 30,
        "data.facilities": "polaris,aurora",
        "model.name": save_tiny_llama(tmp_path / "model"),
        "model.gguf-file": "",
        "model.cache-dir": str(tmp_path / "cache"),
        "lora.r": 2,
        "lora.alpha": 4,
        "train.local-steps": 1,
        "train.batch-size": 1,
        "train.max-length": 96,
        "strategy.num-rounds": 1,
        "strategy.min-nodes": 2,
        "eval.loss-per-task": 1,
        "eval.generate-per-task": 0,
        "outputs.dir": str(tmp_path / "outputs"),
        **changes,
    }
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(tomli_w.dumps(config))
    return recipe


def test_a_bad_recipe_is_one_error_line_before_flower_starts(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path, "bad")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # what building the tiny model printed
    started = time.monotonic()
    assert main(["simulate", str(recipe), "--app", str(PROJECT), "--set", "strategy.name=fedfoo"]) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [error[0]] and error[0].startswith("chemfl: error:") and "fedfoo" in error[0]
    assert main(["simulate", str(recipe), "--app", str(PROJECT), "--set", "lora.target-modules=q_proj,nope"]) != 0
    error = capsys.readouterr().err
    assert "nope" in error and "linear" in error  # names the missing module and the model's linear layers
    assert time.monotonic() - started < 30 and not (tmp_path / ".flwr").exists()  # Flower never started


def test_a_failed_run_is_a_non_zero_exit_naming_the_fix(tmp_path):
    # Two facilities in the recipe, one simulated SuperNode: the ServerApp stops at once.
    recipe = tiny_recipe(tmp_path, "short")
    started = time.monotonic()
    result = simulate(recipe, PROJECT, tmp_path, num_supernodes=1, cpus_per_client=1, capture=True, timeout=300)
    assert result.returncode != 0 and result.status == "finished:failed", (result.status, result.details)
    assert "num-supernodes" in (result.stdout + result.stderr) and time.monotonic() - started < 120


def test_two_simulations_in_one_folder_both_finish_and_stop_only_their_own_superlink(tmp_path):
    recipes = [tiny_recipe(tmp_path, name) for name in ("first", "second")]
    results = {}

    def run(recipe):
        results[recipe.stem] = simulate(recipe, PROJECT, tmp_path, cpus_per_client=1, capture=True, timeout=600)

    threads = [threading.Thread(target=run, args=(recipe,)) for recipe in recipes]
    for thread in threads:
        thread.start()
        time.sleep(5)  # the second starts while the first runs
    for thread in threads:
        thread.join()
    for name in ("first", "second"):
        assert results[name].returncode == 0 and results[name].status == "finished:completed", results[name].status
        lines = (tmp_path / "outputs" / name / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["round"] == 1
    assert all(not superlink_pids(home) for home in (tmp_path / ".flwr").glob("simulate-*"))


def test_a_superlink_that_dies_mid_run_is_a_failure(tmp_path):
    recipe = tiny_recipe(tmp_path, "killed", **{"strategy.num-rounds": 50})
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            run=simulate(recipe, PROJECT, tmp_path, cpus_per_client=1, capture=True, timeout=600)
        )
    )
    thread.start()
    metrics = tmp_path / "outputs" / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(1)
    killed = [pid for home in (tmp_path / ".flwr").glob("simulate-*") for pid in superlink_pids(home)]
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    thread.join(300)
    assert result["run"].returncode != 0 and result["run"].status == "superlink-died"
    # What the SuperLink started (SuperExec, the simulation, Ray) did not outlive it.
    groups = subprocess.run(["ps", "-eo", "pgid="], capture_output=True, text=True).stdout.split()
    assert not set(map(int, groups)) & set(killed)
