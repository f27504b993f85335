"""A scripted Grid for the asynchronous loop: virtual time, per-node speeds, joins and leaves,
and per-node queues of reply kinds (ok, error, nan, keys, shape, dtype, big)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from chemfl.server_app.async_loop import to_record


def fake_training(params: dict, node_id: int, task_id: int) -> dict:
    """Deterministic 'training': pull every tensor towards a node-specific target."""
    return {
        name: (0.5 * value + 0.5 * (node_id + 0.01 * task_id)).astype(value.dtype) for name, value in params.items()
    }


@dataclass
class FakeGrid:
    durations: dict[int, float]  # node id -> seconds per task
    online: set[int] = field(default_factory=set)
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (time, "join" | "leave", node)
    reply_kinds: dict[int, list[str]] = field(default_factory=dict)  # node -> kinds for its next replies
    now: float = 0.0
    pushed: list = field(default_factory=list)
    _queue: list = field(default_factory=list)  # (finish time, seq, message id, node, message)
    _seq: int = 0
    fail_after_pulls: int | None = None  # raise after this many replies: a crashing ServerApp

    def __post_init__(self) -> None:
        if not self.online:
            self.online = set(self.durations)
        self.events.sort()

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self._apply_events(self.now + seconds)
        self.now += seconds

    def _apply_events(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            _, action, node = self.events.pop(0)
            if action == "join":
                self.online.add(node)
            else:
                self.online.discard(node)
                self._queue = [item for item in self._queue if item[3] != node]
                heapq.heapify(self._queue)

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            assert node in self.online, "dispatched to an offline node"
            assert all(item[3] != node for item in self._queue), "two messages in flight for one node"
            self._seq += 1
            message_id = f"m{self._seq}"
            heapq.heappush(self._queue, (self.now + self.durations[node], self._seq, message_id, node, message))
            self.pushed.append((node, message))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        if not self._queue:
            return []
        finish, _, message_id, node, message = heapq.heappop(self._queue)
        self._apply_events(finish)
        self.now = max(self.now, finish)
        if node not in self.online or message_id not in wanted:
            return []
        if self.fail_after_pulls is not None:
            self.fail_after_pulls -= 1
            if self.fail_after_pulls < 0:
                raise KeyboardInterrupt("the ServerApp was stopped")
        return [self._reply(node, message_id, message)]

    def _reply(self, node: int, message_id: str, message):
        kind = self.reply_kinds.get(node, []).pop(0) if self.reply_kinds.get(node) else "ok"
        metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=message_id)
        if kind == "error":
            return SimpleNamespace(
                metadata=metadata,
                has_error=lambda: True,
                error=SimpleNamespace(code=2, reason="ClientApp raised an exception"),
            )
        sent = {k: v.numpy() for k, v in message.content["arrays"].items()}
        trained = fake_training(sent, node, int(message.content["config"]["task-id"]))
        if kind == "nan":
            first = next(iter(trained))
            trained[first] = trained[first].copy()
            trained[first].flat[0] = np.nan
        elif kind == "keys":
            trained["unexpected.weight"] = trained.pop(next(iter(trained)))
        elif kind == "shape":
            first = next(iter(trained))
            trained[first] = np.zeros((1, 1), dtype=trained[first].dtype)
        elif kind == "dtype":
            trained = {k: v.astype(np.float64) for k, v in trained.items()}
        elif kind == "big":
            trained = {k: v + 1e6 for k, v in trained.items()}
        content = RecordDict(
            {
                "arrays": to_record(trained),
                "metrics": MetricRecord(
                    {
                        "num-examples": 10,
                        "train-loss": 1.0,
                        "steps": 1,
                        "seconds": self.durations[node],
                        "tokens-per-second": 1.0,
                    }
                ),
                "node": ConfigRecord({"facility": f"site{node}"}),
            }
        )
        return SimpleNamespace(metadata=metadata, has_error=lambda: False, content=content)
