"""`eval.at = <facility>` through `flwr run`: the facility's evaluation writes the same
metrics.jsonl fields and numbers as the server's, and the server never loads the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from chemfl.simulation import simulate
from tests.tiny import save_tiny_llama

PROJECT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, model: str, eval_at: str) -> tuple[list[dict], str]:
    config = {
        "run-name": f"eval-{eval_at}",
        "data.path": str(tmp_path / "data"),
        "data.max-molecules": 30,
        "data.facilities": "polaris,aurora",
        "model.name": model,
        "model.gguf-file": "",
        "model.cache-dir": str(tmp_path / "cache"),
        "lora.r": 4,
        "lora.alpha": 8,
        "train.local-steps": 2,
        "train.batch-size": 2,
        "train.max-length": 128,
        "strategy.num-rounds": 1,
        "strategy.min-nodes": 2,
        "eval.at": eval_at,
        "eval.loss-per-task": 2,
        "eval.generate-per-task": 1,
        "eval.max-new-tokens": 8,
        "outputs.dir": str(tmp_path / "outputs"),
    }
    recipe = tmp_path / f"{eval_at}.toml"
    recipe.write_text(tomli_w.dumps(config))
    done = simulate(recipe, PROJECT, tmp_path, num_supernodes=2, cpus_per_client=1, capture=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    metrics = tmp_path / "outputs" / f"eval-{eval_at}" / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()], output


def test_a_facility_evaluates_as_the_server_would(tmp_path):
    model = save_tiny_llama(tmp_path / "model")
    at_server, _ = run(tmp_path, model, "server")
    at_facility, output = run(tmp_path, model, "aurora")
    assert "base model not loaded" in output
    rounds = {
        name: [line for line in lines if line["event"] == "round"]
        for name, lines in (("server", at_server), ("facility", at_facility))
    }
    assert [line.keys() for line in rounds["server"]] == [line.keys() for line in rounds["facility"]]
    for server_line, facility_line in zip(rounds["server"], rounds["facility"], strict=True):
        server_eval, facility_eval = server_line["eval"], facility_line["eval"]
        assert server_eval.keys() == facility_eval.keys()
        assert facility_eval["loss"] == pytest.approx(server_eval["loss"], rel=1e-5)
        for task, metrics in server_eval["tasks"].items():
            for name, value in metrics.items():
                number = isinstance(value, float | int) and not isinstance(value, bool)
                expected = pytest.approx(value, rel=1e-5, nan_ok=True) if number else value
                assert facility_eval["tasks"][task][name] == expected, (task, name)
    adapter = tmp_path / "outputs" / "eval-aurora" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
