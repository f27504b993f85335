"""Central evaluation where the GPUs are: `eval.at = <facility>`.

The server sends the global adapter to the named facility's SuperNode as an evaluate message with
`evaluate-on = "test"`; the facility runs exactly the evaluation the server would (the held-out
test set, loss per answer token and per-task chemistry metrics) and replies with the result.
Evaluations are not training: they never occupy a training slot and never count as updates. They
are queued and sent whenever the facility is online; a facility that is offline (its batch job
queued) delays only its evaluations. Which SuperNode serves the facility is asked with the
ClientApp's query message, once per node, as nodes come online.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from chemfl import protocol
from chemfl.protocol import NodeInfo, Task
from chemfl.server_app.async_loop import to_record

Params = dict[str, np.ndarray]


@dataclass
class EvaluationRequest:
    step: int  # the round or version evaluated
    params: Params
    requested_at: float  # the run's clock when that version was published


@dataclass
class FacilityEvaluation:
    grid: Grid
    facility: str
    train_config: dict  # what every task carries (FFA-LoRA's A digest)
    message_ttl: float
    on_result: Callable[[EvaluationRequest, dict, float], None] | None  # (request, result, run clock now)
    node_id: int | None = None
    queued: list[EvaluationRequest] = field(default_factory=list)
    in_flight: dict[str, EvaluationRequest] = field(default_factory=dict)  # message id -> request
    queries: dict[str, int] = field(default_factory=dict)  # query message id -> node asked
    asked: set[int] = field(default_factory=set)
    finished: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) not yet collected
    now: float = 0.0  # the run's clock at the last call from the loop

    # --- what the asynchronous loop calls (chemfl.server_app.async_loop.DeferredEvaluation) -------

    def request(self, step: int, params: Params, requested_at: float) -> None:
        self.queued.append(EvaluationRequest(step, params, requested_at))
        self.advance()

    def collect(self, now: float) -> list[tuple[int, float]]:
        """(step, loss) of evaluations that came back since the last call; `now` is the run's clock."""
        self.now = now
        self.advance()
        done, self.finished = self.finished, []
        return done

    def pending(self) -> bool:
        return bool(self.queued or self.in_flight)

    # --- synchronous use (Flower's FedAvg calls evaluate_fn and waits) ----------------------------

    def evaluate_state(self, step: int, state: dict) -> dict:
        """CentralEvaluator's `run_evaluation` for synchronous rounds: the packed adapter in, result out."""
        return self.evaluate_now(step, state)

    def evaluate_now(self, step: int, params: Params, poll_seconds: float = 0.2) -> dict:
        results: dict[int, dict] = {}
        on_result = self.on_result
        self.on_result = lambda request, result, now: results.__setitem__(request.step, result)
        try:
            self.request(step, params, 0.0)
            while step not in results:
                time.sleep(poll_seconds)
                self.advance()
        finally:
            self.on_result = on_result
        return results[step]

    # --- messages --------------------------------------------------------------------------------

    def advance(self) -> None:
        """Find the facility's node, send what is queued, take what came back; never blocks."""
        online = set(self.grid.get_node_ids())
        if self.node_id is not None and self.node_id not in online:
            self._node_gone("its SuperNode left")
        self._ask_new_nodes(online)
        self._take_replies()
        if self.node_id is not None and self.queued:
            self._send_queued()

    def _ask_new_nodes(self, online: set[int]) -> None:
        if self.node_id is not None:
            return
        for node in sorted(online - self.asked):
            message = Message(RecordDict(), dst_node_id=node, message_type=protocol.QUERY, ttl=self.message_ttl)
            [message_id] = list(self.grid.push_messages([message]))
            self.queries[message_id] = node
            self.asked.add(node)

    def _send_queued(self) -> None:
        for request in self.queued:
            task = Task(server_round=request.step, evaluate_on=Task.TEST_SET)
            content = {
                protocol.ARRAYS: to_record(request.params),
                protocol.CONFIG: ConfigRecord({**self.train_config, **task.to_config()}),
            }
            message = Message(
                RecordDict(content), dst_node_id=self.node_id, message_type=protocol.EVALUATE, ttl=self.message_ttl
            )
            [message_id] = list(self.grid.push_messages([message]))
            self.in_flight[message_id] = request
        self.queued = []

    def _take_replies(self) -> None:
        waiting = list(self.queries) + list(self.in_flight)
        if not waiting:
            return
        for reply in self.grid.pull_messages(waiting):
            message_id = reply.metadata.reply_to_message_id
            if message_id in self.queries:
                node = self.queries.pop(message_id)
                if (
                    not reply.has_error()
                    and NodeInfo.from_record(reply.content[protocol.NODE]).facility == self.facility
                ):
                    self.node_id = node
            elif message_id in self.in_flight:
                self._evaluated(self.in_flight.pop(message_id), reply)

    def _serves_the_facility(self, reply: Message) -> bool:
        return NodeInfo.from_record(reply.content[protocol.NODE]).facility == self.facility

    def _evaluated(self, request: EvaluationRequest, reply: Message) -> None:
        if reply.has_error():
            log(
                WARNING,
                "evaluation of %d at %s failed (%s); sending it again",
                request.step,
                self.facility,
                reply.error.reason,
            )
            self.queued.append(request)
            self._node_gone("its evaluation failed")
            return
        result = json.loads(str(reply.content[protocol.EVALUATION][protocol.EVALUATION_RESULT]))
        self.finished.append((request.step, float(result["loss"])))
        self.on_result(request, result, self.now)

    def _node_gone(self, why: str) -> None:
        """Forget the node; what it had in flight is queued again for whichever node serves next."""
        log(
            WARNING,
            "%s: evaluation node %s lost (%s); waiting for the facility to come back",
            self.facility,
            self.node_id,
            why,
        )
        self.queued.extend(self.in_flight.values())
        self.in_flight.clear()
        if self.node_id is not None:
            self.asked.discard(self.node_id)  # ask it again when it is back: it may be another facility's
        self.node_id = None
