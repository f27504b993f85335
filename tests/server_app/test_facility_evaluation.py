"""`eval.at = <facility>`: central evaluation dispatched to a facility, never stalling training."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from chemfl import protocol
from chemfl.server_app.async_loop import AsyncRun
from chemfl.server_app.checkpoint import AsyncState
from chemfl.server_app.facility_evaluation import FacilityEvaluation
from tests.server_app.fake_grid import FakeGrid
from tests.server_app.rule_defaults import fedasync, settings

pytestmark = pytest.mark.usefixtures("server_task_identity")


def fake_loss(params: dict) -> float:
    return float(np.mean([np.abs(value).mean() for value in params.values()]))


class EvaluatingGrid:
    """FakeGrid trains; query and evaluate messages are answered at once by the addressed node
    while it is online (the evaluating facility's SuperNode), with a loss computed from the adapter."""

    def __init__(self, fake: FakeGrid):
        self.fake = fake
        self.side: dict[str, tuple[int, object]] = {}  # message id -> (node, message)
        self.sequence = 0

    def get_node_ids(self):
        return self.fake.get_node_ids()

    def push_messages(self, messages):
        ids = []
        for message in messages:
            if message.metadata.message_type == protocol.TRAIN:
                ids.extend(self.fake.push_messages([message]))
            else:
                self.sequence += 1
                ids.append(f"side{self.sequence}")
                self.side[ids[-1]] = (message.metadata.dst_node_id, message)
        return ids

    def pull_messages(self, message_ids):
        wanted = list(message_ids)
        side = [i for i in wanted if i in self.side]
        replies = [self._answer(i) for i in side if self.side[i][0] in self.fake.online]
        for reply in replies:
            del self.side[reply.metadata.reply_to_message_id]
        trained = [i for i in wanted if i not in self.side and not i.startswith("side")]
        return replies + (list(self.fake.pull_messages(trained)) if trained else [])

    def _answer(self, message_id: str):
        node, message = self.side[message_id]
        metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=message_id)
        if message.metadata.message_type == protocol.QUERY:
            content = RecordDict({protocol.NODE: ConfigRecord({"facility": f"site{node}"})})
        else:
            params = {k: v.numpy() for k, v in message.content[protocol.ARRAYS].items()}
            result = {"loss": fake_loss(params), "n_loss": 1, "n_generated": 0, "tasks": {}, "overall": {}}
            content = RecordDict(
                {
                    protocol.METRICS: MetricRecord({"num-examples": 1, "eval-loss": result["loss"]}),
                    protocol.EVALUATION: ConfigRecord({protocol.EVALUATION_RESULT: json.dumps(result)}),
                }
            )
        return SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content)


def initial_params():
    rng = np.random.default_rng(0)
    return {"m.lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32)}


def test_an_offline_evaluating_facility_delays_its_evaluations_never_training():
    # site3 evaluates; its batch job starts at t = 50, while sites 1 and 2 train from t = 0.
    fake = FakeGrid(durations={1: 1.0, 2: 1.5, 3: 1.0}, online={1, 2}, events=[(50.0, "join", 3)])
    grid = EvaluatingGrid(fake)
    results = []
    evaluation = FacilityEvaluation(
        grid, "site3", {}, 3600.0, on_result=lambda request, result, now: results.append((request, result, now))
    )
    lines: list[dict] = []
    run = AsyncRun(
        grid=grid,
        strategy=fedasync(),
        state=AsyncState(params=initial_params()),
        settings=settings(num_versions=60, eval_every=20, poll_seconds=1.0),
        evaluate=lambda version, params: pytest.fail("with eval.at a facility, the server evaluates nothing"),
        record=lines.append,
        clock=fake.clock,
        sleep=fake.advance,
        deferred=evaluation,
    )
    run.run()
    versions = [line for line in lines if line["event"] == "version"]
    assert [line["version"] for line in versions] == list(range(61))
    assert sum(line["wall_time"] < 50.0 for line in versions) >= 20  # training went on while site3 queued
    assert all(line["eval_loss"] is None for line in versions)  # the loop waited for no evaluation
    evaluated = {request.step: (request, result, now) for request, result, now in results}
    assert sorted(evaluated) == [0, 20, 40, 60]
    first_request, first_result, first_arrival = evaluated[0]
    assert first_request.requested_at == 0.0 and first_arrival >= 50.0
    assert first_result["loss"] == pytest.approx(fake_loss(initial_params()))
    assert run.last_loss == pytest.approx(evaluated[60][1]["loss"])
    assert not evaluation.pending()
    # Evaluations are not training: no train message ever carried evaluate-on, none counted.
    assert all("evaluate-on" not in message.content["config"] for _, message in fake.pushed)
    assert sum(line["event"] == "update" and line["accepted"] for line in lines) == 60


def test_evaluation_lost_with_its_node_is_sent_again_when_the_facility_returns():
    fake = FakeGrid(durations={1: 1.0, 3: 1.0}, online={1, 3}, events=[(0.5, "leave", 3), (30.0, "join", 3)])
    grid = EvaluatingGrid(fake)
    results = []
    evaluation = FacilityEvaluation(grid, "site3", {}, 3600.0, on_result=lambda *args: results.append(args))
    evaluation.advance()  # the query reaches site3 while it is online
    assert evaluation.node_id == 3
    fake.advance(1.0)  # site3's job ends
    evaluation.request(7, initial_params(), 1.0)
    assert evaluation.pending() and evaluation.node_id is None
    while fake.now < 40.0 and evaluation.pending():
        evaluation.collect(fake.now)
        fake.advance(1.0)
    assert [request.step for request, _, _ in results] == [7] and results[0][2] >= 30.0
