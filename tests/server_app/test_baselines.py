"""The baselines (strategy centralized / local) through the ServerApp's main, on a tiny model and a
real build: equal compute, the same training as a federated node, the run folder `chemfl report`
and `chemfl eval` read, and bad settings refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from chemfl.checks import check_run_config
from chemfl.config import resolve
from chemfl.errors import ChemFLError
from chemfl.llm.reload import evaluate_saved_adapter
from chemfl.server_app.app import main
from chemfl.server_app.strategy_spec import StrategySpec
from tests.tiny import save_tiny_llama

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("baselines") / "model")


def baseline_config(tmp: Path, model: str, facilities: str, **knobs) -> dict:
    return resolve(
        {
            "data.path": str(tmp / f"data-{facilities.replace(',', '-')}"),
            "data.max-molecules": 30,
            "data.facilities": facilities,
            "model.name": model,
            "model.gguf-file": "",
            "model.cache-dir": str(tmp / "cache"),
            "lora.r": 4,
            "lora.alpha": 8,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.lr": 0.01,
            "train.max-length": 128,
            "strategy.num-rounds": 2,
            "eval.loss-per-task": 2,
            "eval.generate-per-task": 1,
            "eval.max-new-tokens": 8,
            "outputs.dir": str(tmp / "outputs"),
            **knobs,
        }
    )


def run_server_app(config: dict) -> Path:
    """The ServerApp's main as Flower calls it; a baseline never touches the grid."""
    main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return Path(str(config["outputs.dir"])) / str(config["run-name"])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_centralized_on_one_shard_is_local_on_that_shard(tiny_model, tmp_path):
    common = {"strategy.name": "centralized", "run-name": "pooled"}
    pooled = run_server_app(baseline_config(tmp_path, tiny_model, "polaris", **common))
    alone = run_server_app(
        baseline_config(tmp_path, tiny_model, "polaris", **{**common, "strategy.name": "local", "run-name": "alone"})
    )
    trained = load_file(pooled / "adapter" / "adapter_model.safetensors")
    local = load_file(alone / "adapter-polaris" / "adapter_model.safetensors")
    assert trained.keys() == local.keys()
    assert all(torch.equal(trained[name], local[name]) for name in trained)  # bit for bit
    assert any(name.endswith("lora_B.weight") and trained[name].abs().sum() > 0 for name in trained)  # it trained
    # FedAvg's total on one facility: 2 rounds x 1 facility x 2 local steps.
    [pooled_training] = [line for line in metrics(pooled) if line["event"] == "training"]
    [alone_training] = [line for line in metrics(alone) if line["event"] == "training"]
    assert pooled_training["steps"] == alone_training["steps"] == 4 and pooled_training["examples"] == 8
    assert pooled_training["train_loss"] == alone_training["train_loss"]


def test_local_trains_one_peft_adapter_per_facility_that_chemfl_eval_reads(tiny_model, tmp_path):
    config = baseline_config(
        tmp_path,
        tiny_model,
        "polaris,aurora",
        **{"strategy.name": "local", "run-name": "local", "strategy.min-nodes": 2},
    )
    run = run_server_app(config)
    lines = metrics(run)
    assert lines[0] == {**lines[0], "event": "run", "strategy": "local"}
    training = [line for line in lines if line["event"] == "training"]
    assert [(line["adapter"], line["facilities"]) for line in training] == [
        ("adapter-polaris", ["polaris"]),
        ("adapter-aurora", ["aurora"]),
    ]
    # Each facility trains the whole federation's steps: 2 rounds x 2 facilities x 2 local steps.
    assert all(line["steps"] == 8 and line["examples"] == 16 for line in training)
    evaluations = [line for line in lines if line["event"] == "evaluation"]
    assert [line["adapter"] for line in evaluations] == ["adapter-polaris", "adapter-aurora"]  # no global model
    assert all(line["eval"]["tasks"] and line["facility"] == "server" for line in evaluations)
    assert {path.name for path in run.iterdir() if path.is_dir()} == {"adapter-polaris", "adapter-aurora"}
    polaris, aurora = (
        load_file(run / f"adapter-{name}" / "adapter_model.safetensors") for name in ("polaris", "aurora")
    )
    assert any(not torch.equal(polaris[name], aurora[name]) for name in polaris)  # two shards, two models
    for name in ("polaris", "aurora"):
        assert {path.name for path in (run / f"adapter-{name}").iterdir()} >= PEFT_FILES
    # Reloaded with plain peft (`chemfl eval`): the loss the run recorded.
    reloaded = evaluate_saved_adapter(run / "adapter-aurora", config)
    assert reloaded["loss"] == pytest.approx(evaluations[1]["eval_loss"], abs=1e-5)
    assert json.loads((run / "config.json").read_text())["strategy.name"] == "local"


def test_centralized_pools_every_shard_and_evaluates_before_and_after(tiny_model, tmp_path):
    config = baseline_config(
        tmp_path,
        tiny_model,
        "polaris,aurora",
        **{
            "strategy.name": "centralized",
            "run-name": "centralized",
            "strategy.baseline-match": "fedbuff",
            "strategy.num-versions": 3,
            "strategy.buffer-size": 2,
        },
    )
    run = run_server_app(config)
    lines = metrics(run)
    [training] = [line for line in lines if line["event"] == "training"]
    shards = [
        json.loads((Path(config["data.path"]) / "partitions" / f / "shard.json").read_text())
        for f in ("polaris", "aurora")
    ]
    assert training["facilities"] == ["polaris", "aurora"]
    assert training["records"] == sum(sum(shard["counts"]["train"].values()) for shard in shards)
    assert training["steps"] == 3 * 2 * 2  # FedBuff's total: versions x buffer x local steps
    evaluations = [line for line in lines if line["event"] == "evaluation"]
    assert [(line["version"], line["adapter"]) for line in evaluations] == [(0, None), (1, None)]
    assert evaluations[1]["eval_loss"] < evaluations[0]["eval_loss"]
    assert {path.name for path in (run / "adapter").iterdir()} >= PEFT_FILES


def spec(**knobs) -> StrategySpec:
    return StrategySpec.from_config(resolve({"data.facilities": "polaris,aurora,frontier", **knobs}))


def test_matched_steps_are_the_federated_runs_total():
    # FedAvg samples max(int(N x fraction-train), min-nodes) of the N facilities each round.
    assert spec(**{"strategy.num-rounds": 3, "strategy.min-nodes": 3}).matched_steps() == 3 * 3 * 8
    assert spec(**{"strategy.fraction-train": 0.5, "strategy.min-nodes": 1}).matched_steps() == 3 * 1 * 8
    assert spec(**{"strategy.min-nodes": 4}).matched_steps() == 3 * 3 * 8  # never more than the facilities
    fedbuff = {"strategy.baseline-match": "fedbuff", "strategy.num-versions": 5, "strategy.buffer-size": 3}
    assert spec(**fedbuff).matched_steps() == 5 * 3 * 8
    assert spec(**{"strategy.baseline-match": "fedasync", "strategy.num-versions": 5}).matched_steps() == 5 * 8
    assert spec(**{"strategy.baseline-steps": 7, **fedbuff}).matched_steps() == 7


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"eval.at": "aurora"}, r"eval.at = 'aurora': the local baseline trains and evaluates in the ServerApp"),
        ({"emulation.virtual-time": True}, "baselines train in the ServerApp's process in real time"),
        ({"strategy.baseline-match": "fedqueue"}, r"strategy.baseline-match = 'fedqueue'; use one of fedavg"),
        ({"strategy.baseline-steps": -1}, r"strategy.baseline-steps = -1 must be >= 0"),
        ({"resume": "outputs/local"}, "resume is for asynchronous runs"),
    ],
)
def test_bad_baseline_settings_are_refused_before_any_work(knobs, message):
    config = resolve({"strategy.name": "local", "data.facilities": "polaris,aurora", **knobs})
    with pytest.raises(ChemFLError, match=message):
        check_run_config(config)
