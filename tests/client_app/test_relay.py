"""The ClientApp as a relay to a real facility trainer (2 CPU ranks, gloo): the reply holds exactly
what the local path's holds, the model is loaded once for many messages, and a dead trainer is an
error within seconds."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from chemfl.client_app.app import evaluate_node, train
from chemfl.errors import ChemFLError
from chemfl.protocol import EvalReport, TrainReport
from chemfl.server_app.async_loop import to_record
from tests.trainer.conftest import trainer_setup  # noqa: F401 (the fixture)
from tests.trainer.harness import TrainerProcess, as_arrays, fresh_adapter

pytestmark = pytest.mark.usefixtures("server_task_identity")


@pytest.fixture(scope="module")
def trainer(trainer_setup, tmp_path_factory):  # noqa: F811
    process = TrainerProcess(trainer_setup, tmp_path_factory.mktemp("relay"), ranks=2)
    process.wait_ready()
    yield trainer_setup, process
    process.kill()


def message(setup, message_type: str, round_: int = 1) -> Message:
    model, _ = fresh_adapter(setup.config)
    content = RecordDict(
        {"arrays": to_record(as_arrays(model, setup.config)), "config": ConfigRecord({"server-round": round_})}
    )
    return Message(content=content, dst_node_id=7, message_type=message_type)


def context(setup, process) -> Context:
    node_config = {"trainer": f"unix:{process.socket}", "trainer-secret-file": str(process.secret)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=setup.config)


def test_relay_replies_exactly_what_the_local_path_replies_and_loads_the_model_once(trainer):
    setup, process = trainer
    sent = message(setup, "train")
    for round_ in (1, 2, 3):
        reply = train(message(setup, "train", round_), context(setup, process))
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "node"}
    assert set(content["arrays"].keys()) == set(sent.content["arrays"].keys())
    assert all(array.dtype == "float32" for array in content["arrays"].values())
    assert set(content["metrics"].keys()) == set(TrainReport.KEYS.values())
    assert dict(content["node"]) == {"facility": "polaris"}  # the facility's name, no data
    assert content["metrics"]["steps"] == setup.config["train.local-steps"]
    evaluated = evaluate_node(message(setup, "evaluate"), context(setup, process)).content
    assert set(evaluated.keys()) == {"metrics"}
    assert set(evaluated["metrics"].keys()) <= set(EvalReport.KEYS.values())
    assert process.count(r"model loaded") == 2  # once per rank, for 4 messages


def test_the_relay_path_imports_neither_torch_nor_transformers():
    code = (
        "import sys, time; started = time.perf_counter(); import chemfl.client_app.app, chemfl.client_app.relay; "
        "print(time.perf_counter() - started, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    seconds, torch_loaded, transformers_loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert torch_loaded == "False" and transformers_loaded == "False"


def test_a_dead_trainer_is_an_error_within_seconds(trainer_setup, tmp_path):  # noqa: F811
    process = TrainerProcess(trainer_setup, tmp_path, ranks=2)
    process.wait_ready()
    process.kill()
    started = time.monotonic()
    with pytest.raises(ChemFLError):
        train(message(trainer_setup, "train"), context(trainer_setup, process))
    assert time.monotonic() - started < 10
