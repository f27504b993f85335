"""The ClientApp's train handler, called as Flower calls it, on a tiny model and a real shard."""

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from chemfl.client_app.app import evaluate_node, train
from chemfl.config import resolve
from chemfl.data_prep.build import BuildSpec, build_dataset
from chemfl.errors import ChemFLError
from chemfl.llm.lora import adapter_layout, packed_state
from chemfl.llm.session import get_session
from chemfl.protocol import TrainReport
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.usefixtures("server_task_identity")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    config = resolve(
        {
            "data.path": str(tmp / "data"),
            "data.max-molecules": 30,
            "data.facilities": "polaris,aurora",
            "model.name": save_tiny_llama(tmp / "model"),
            "model.gguf-file": "",
            "model.cache-dir": str(tmp / "cache"),
            "lora.r": 4,
            "lora.alpha": 8,
            "train.local-steps": 2,
            "train.batch-size": 2,
            "train.max-length": 128,
            "eval.loss-per-task": 2,
        }
    )
    build_dataset(BuildSpec.from_config(config), tmp / "data")
    return config


def message(config, message_type="train"):
    session = get_session(config)
    packed = packed_state(session.model, session.lora_spec)
    layout = adapter_layout(session.model, session.lora_spec).digest
    content = RecordDict(
        {
            "arrays": ArrayRecord({name: Array(value) for name, value in packed.items()}),
            "config": ConfigRecord({"server-round": 1, "adapter-layout": layout}),
        }
    )
    return Message(content=content, dst_node_id=7, message_type=message_type)


def context(config, node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=config)


def test_only_adapter_tensors_and_named_scalars_leave_the_node(setup):
    sent = message(setup)
    reply = train(sent, context(setup, {"partition-id": 1, "num-partitions": 2}))
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "node"}
    arrays = content["arrays"]
    assert list(arrays.keys()) == ["adapter"]  # one packed vector (chemfl.llm.packing) ...
    session = get_session(setup)
    layout = adapter_layout(session.model, session.lora_spec)
    assert all(".lora_A." in name or ".lora_B." in name for name in layout.names)  # ... of adapter tensors only
    assert arrays["adapter"].dtype == "float32" and tuple(arrays["adapter"].shape) == (layout.size,)
    assert set(content["metrics"].keys()) == set(TrainReport.KEYS.values())
    assert all(isinstance(value, (int, float)) for value in content["metrics"].values())
    assert dict(content["node"]) == {"facility": "aurora"}  # the facility's name, no data
    assert content["metrics"]["steps"] == 2 and content["metrics"]["num-examples"] > 0
    received = arrays.to_torch_state_dict()
    original = sent.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(received[k], original[k]) for k in received)


def test_an_adapter_of_another_layout_is_refused_before_training(setup):
    node = context(setup, {"partition-id": 0, "num-partitions": 2})
    with pytest.raises(ChemFLError, match="layout differs from this model's LoRA layout"):
        train(message_with(setup, **{"adapter-layout": "0" * 16}), node)
    truncated = message(setup)
    truncated.content["arrays"] = ArrayRecord({"adapter": Array(truncated.content["arrays"]["adapter"].numpy()[:-1])})
    with pytest.raises(ChemFLError, match="values in shape"):
        train(truncated, node)


def test_evaluate_handler_reports_validation_loss(setup):
    reply = evaluate_node(message(setup, "evaluate"), context(setup, {"partition-id": 0, "num-partitions": 2}))
    metrics = reply.content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "eval-loss"}
    assert metrics["eval-loss"] > 0 and metrics["num-examples"] > 0


def test_deployment_reads_the_shard_from_data_path(setup, tmp_path):
    shard = f"{setup['data.path']}/partitions/polaris"
    reply = train(message(setup), context(setup, {"data-path": shard}))
    assert dict(reply.content["node"]) == {"facility": "polaris"}


def test_simulation_size_must_match_the_facilities(setup):
    with pytest.raises(ChemFLError, match="set num-supernodes = 2"):
        train(message(setup), context(setup, {"partition-id": 0, "num-partitions": 3}))


def test_tampered_shard_is_refused_before_training(setup, tmp_path):
    import shutil

    shard = tmp_path / "polaris"
    shutil.copytree(f"{setup['data.path']}/partitions/polaris", shard)
    with (shard / "train.parquet").open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ChemFLError, match="does not match its manifest"):
        train(message(setup), context(setup, {"data-path": str(shard)}))
    with pytest.raises(ChemFLError, match="not a ChemFL shard"):
        train(message(setup), context(setup, {"data-path": str(tmp_path)}))


def message_with(config, **sent):
    msg = message(config)
    for key, value in sent.items():
        msg.content["config"][key] = value
    return msg


def test_the_server_sets_each_tasks_local_steps(setup):
    reply = train(message_with(setup, **{"local-steps": 3}), context(setup, {"partition-id": 0, "num-partitions": 2}))
    assert reply.content["metrics"]["steps"] == 3


def test_supernodes_of_one_facility_train_on_disjoint_slices(setup):
    shard = f"{setup['data.path']}/partitions/polaris"
    whole = train(message(setup), context(setup, {"data-path": shard}))
    halves = [train(message(setup), context(setup, {"data-path": shard, "data-slice": f"{i}/2"})) for i in range(2)]
    sizes = [reply.content["metrics"]["num-examples"] for reply in halves]
    assert sum(sizes) == whole.content["metrics"]["num-examples"] and abs(sizes[0] - sizes[1]) <= 1
    for bad in ("2/2", "x/3", "1"):
        with pytest.raises(ChemFLError, match="data-slice"):
            train(message(setup), context(setup, {"data-path": shard, "data-slice": bad}))


def test_replies_carry_the_batch_jobs_remaining_walltime(setup):
    import time

    end = time.time() + 1800
    reply = train(message(setup), context(setup, {"partition-id": 0, "num-partitions": 2, "job-end-time": end}))
    assert 1700 < reply.content["node"]["walltime-remaining"] <= 1800
