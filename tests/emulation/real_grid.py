"""A stand-in for Flower's Grid as the laptop sees it: replies come back in a shuffled real order
(seeded), whatever their virtual completion times; 'training' is a deterministic function of the
sent adapter, the node and the task."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from chemfl.server_app.async_loop import to_record

FACILITIES = ("polaris", "aurora", "frontier", "perlmutter")


def fake_training(params: dict, node_id: int, task_id: int, steps: int) -> dict:
    pull = 1.0 - 0.9**steps  # more local steps move further
    return {
        name: (value + pull * (0.1 * node_id + 0.001 * task_id - value)).astype(value.dtype)
        for name, value in params.items()
    }


@dataclass
class ShuffledGrid:
    order_seed: int = 0
    facilities: tuple[str, ...] = FACILITIES
    pushed: list = field(default_factory=list)  # (real node id, message)
    _pending: dict = field(default_factory=dict)  # message id -> (node, message)
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.order_seed)

    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(len(self.facilities))]  # real ids differ from virtual ones

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = f"real-{len(self.pushed)}"
            self.pushed.append((message.metadata.dst_node_id, message))
            self._pending[message_id] = (message.metadata.dst_node_id, message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        ready = [m for m in message_ids if m in self._pending and self._rng.random() < 0.5]
        return [self._reply(message_id, *self._pending.pop(message_id)) for message_id in ready]

    def _reply(self, message_id: str, node: int, message):
        config = message.content["config"]
        steps = int(config.get("local-steps", 5))
        sent = {k: v.numpy() for k, v in message.content["arrays"].items()}
        trained = fake_training(sent, node, int(config["task-id"]), steps)
        content = RecordDict(
            {
                "arrays": to_record(trained),
                "metrics": MetricRecord(
                    {"num-examples": 10, "train-loss": 1.0, "steps": steps, "seconds": 0.01, "tokens-per-second": 1.0}
                ),
                "node": ConfigRecord({"facility": self.facilities[node - 100]}),
            }
        )
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=message_id),
            has_error=lambda: False,
            content=content,
        )
