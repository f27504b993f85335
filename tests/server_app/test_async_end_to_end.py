"""`flwr run` with 3 SuperNodes of deliberately different speeds, asynchronous strategies."""

import json
from collections import Counter
from pathlib import Path

import pytest
import tomli_w

from chemfl.simulation import simulate
from tests.tiny import save_tiny_llama

PROJECT = Path(__file__).resolve().parents[2]


# FedBuff only: FedAsync and the other rules share this loop and Flower path (their rules are tested
# on their own, and through emulated campaigns); one `flwr run` of ~70 s per strategy would cost CI more.
@pytest.mark.parametrize("strategy", ["fedbuff"])
def test_async_simulation_completes_and_fast_nodes_contribute_more(tmp_path, strategy):
    run_config = {
        "run-name": strategy,
        "data.path": str(tmp_path / "data"),
        "data.max-molecules": 30,
        "data.facilities": "polaris,aurora,frontier",
        "model.name": save_tiny_llama(tmp_path / "tiny-llama"),
        "model.gguf-file": "",
        "model.cache-dir": str(tmp_path / "cache"),
        "lora.r": 4,
        "lora.alpha": 8,
        "train.local-steps": 4,
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.name": strategy,
        "strategy.num-versions": 8,
        "strategy.buffer-size": 2,
        "eval.every": 4,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 0,
        # frontier trains 15x slower: it sleeps 14x its training time after each task.
        "emulation.slowdown": "frontier=15",
        "outputs.dir": str(tmp_path / "outputs"),
    }
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(run_config))
    completed = simulate(recipe, PROJECT, tmp_path, num_supernodes=3, cpus_per_client=1, capture=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    run_dir = tmp_path / "outputs" / strategy
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    versions = [line["version"] for line in lines if line["event"] == "version"]
    assert versions == list(range(0, 9))  # version 0: the evaluation before training
    accepted = Counter(line["facility"] for line in lines if line["event"] == "update" and line["accepted"])
    assert accepted["polaris"] > accepted["frontier"] and accepted["aurora"] > accepted["frontier"]
    expected_updates = 8 * (2 if strategy == "fedbuff" else 1)
    assert sum(accepted.values()) == expected_updates
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoint" / "state.json").is_file()
    output = completed.stdout + completed.stderr
    assert "Test set before (version 0)" in output and "version 8 |" in output
