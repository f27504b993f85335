"""A stand-in for the simulation engine as the ServerApp sees it, with the real ClientApp in this
process: every task is trained by ChemFL's own train handler on a real shard, but the order the
laptop trains and returns them in is shuffled (seeded), and before each one torch's random
generator is reseeded at random, as a fresh Ray actor (torch seeds itself at random at start-up)
or one that trained other facilities' tasks before would leave it. What a run writes may depend
on neither."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from flwr.app import Context, RecordDict

from chemfl import protocol
from chemfl.client_app.app import describe_node, train


@dataclass
class ActorPoolGrid:
    run_config: dict
    facilities: tuple[str, ...]
    order_seed: int = 0
    trained: int = 0
    _pending: dict = field(default_factory=dict)  # message id -> (real node id, message)
    _count: int = 0
    _rng: np.random.Generator | None = None

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.order_seed)

    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(len(self.facilities))]  # real ids: not the virtual 1..N

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self._count += 1
            message_id = f"real-{self._count}"
            self._pending[message_id] = (message.metadata.dst_node_id, message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        ready = [m for m in message_ids if m in self._pending and self._rng.random() < 0.5]
        self._rng.shuffle(ready)
        return [self._reply(message_id, *self._pending.pop(message_id)) for message_id in ready]

    def _reply(self, message_id: str, node: int, message):
        partition = node - 100
        context = Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": partition, "num-partitions": len(self.facilities)},
            state=RecordDict(),
            run_config=self.run_config,
        )
        if message.metadata.message_type == protocol.QUERY:
            content = describe_node(message, context).content
        else:
            torch.seed()  # whatever state the actor's generator happens to be in
            content = train(message, context).content
            self.trained += 1
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=message_id),
            has_error=lambda: False,
            content=content,
        )
