"""`flwr run` with the simulation engine: 2 SuperNodes, 2 rounds, a tiny random Llama."""

import json
from pathlib import Path

import pytest
import tomli_w
import torch

from chemfl.config import resolve
from chemfl.data_prep import store
from chemfl.llm.evaluation import EvalSpec, answer_loss, per_task_head
from chemfl.simulation import simulate
from tests.tiny import save_tiny_llama

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    run_config = {
        "run-name": "e2e",
        "data.path": str(tmp_path / "data"),
        "data.max-molecules": 40,
        "data.facilities": "polaris,aurora",
        "model.name": model_dir,
        "model.gguf-file": "",
        "model.cache-dir": str(tmp_path / "cache"),
        "lora.r": 4,
        "lora.alpha": 8,
        "train.local-steps": 3,
        "train.batch-size": 4,
        "train.lr": 0.01,
        "train.max-length": 128,
        "strategy.num-rounds": 2,
        "strategy.min-nodes": 2,
        "strategy.fraction-evaluate": 1.0,
        "eval.every": 1,
        "eval.loss-per-task": 4,
        "eval.generate-per-task": 1,
        "eval.max-new-tokens": 8,
        "outputs.dir": str(tmp_path / "outputs"),
    }
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(run_config))  # flat "a.b" keys: flwr flattens to the same
    completed = simulate(recipe, PROJECT, tmp_path, num_supernodes=2, cpus_per_client=1, capture=True, timeout=600)
    return completed, resolve(run_config), tmp_path / "outputs" / "e2e"


def test_run_completes_and_writes_one_metrics_line_per_aggregation(finished_run):
    completed, _, run_dir = finished_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        assert line["facilities"] == ["aurora", "polaris"]
        assert line["bytes_sent"] > 0 and line["bytes_received"] == line["bytes_sent"]
        assert line["train"]["train-loss"] > 0 and line["failed_replies"] == 0
    assert all("loss" in line["eval"] and line["eval"]["tasks"] for line in lines)
    assert lines[-1]["wall_time"] >= lines[0]["wall_time"]
    assert json.loads((run_dir / "config.json").read_text())["run-name"] == "e2e"
    assert "Test set before (round 0) and after (round 2)" in completed.stdout + completed.stderr


def test_final_adapter_loads_with_plain_peft_and_reproduces_the_reported_loss(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    completed, config, run_dir = finished_run
    assert completed.returncode == 0
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(config["model.name"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config["model.name"])
    model = PeftModel.from_pretrained(base, str(adapter))
    test = store.read_records(__import__("pathlib").Path(config["data.path"]) / "test.parquet")
    spec = EvalSpec.from_config(config)
    loss = answer_loss(
        model,
        tokenizer,
        per_task_head(test, spec.loss_per_task),
        int(config["train.max-length"]),
        spec.batch_size,
        str(config["model.system-prompt"]),
    )
    reported = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["eval"]["loss"]
    assert loss == pytest.approx(reported, rel=1e-4)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["eval"]["loss"]
    assert reported != first  # training changed the adapter
