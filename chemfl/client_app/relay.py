"""The ClientApp as a relay to the facility trainer (the launcher's per-job layout).

The message's arrays and task go to rank 0 of the job's trainer over a node-local, authenticated
Unix socket (chemfl.trainer.channel); its reply becomes the Flower reply, with exactly the
contents the local path produces: the adapter tensors, the TrainReport (or EvalReport) scalars and
the NodeInfo record. This module and what it imports load neither torch nor transformers: Flower
starts a fresh ClientApp process for every message, and on this path that start is all it pays.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from chemfl import protocol
from chemfl.errors import ChemFLError
from chemfl.hpc.walltime import remaining_walltime
from chemfl.protocol import NodeConfig, NodeInfo
from chemfl.trainer.channel import TrainerClient


def trainer_client(node_config: dict) -> TrainerClient:
    """The channel named by node config `trainer = "unix:/path"` and `trainer-secret-file`."""
    address = str(node_config[NodeConfig.TRAINER])
    scheme, _, path = address.partition(":")
    if scheme != "unix" or not path:
        raise ChemFLError(
            f"node config trainer = {address!r} must be 'unix:/path/to/socket' (the facility trainer's socket)"
        )
    secret = node_config.get(NodeConfig.TRAINER_SECRET_FILE)
    if not secret:
        raise ChemFLError(
            "node config has trainer but no trainer-secret-file; start the SuperNode with "
            '--node-config \'trainer="unix:..." trainer-secret-file="/path/to/secret"\''
        )
    return TrainerClient(path, str(secret))


def forward(kind: str, msg: Message, context: Context) -> Message:
    """One train or evaluate message through the trainer. A trainer that is gone, refuses the
    channel or fails the task raises here, and Flower turns that into an error reply at once."""
    node_config = dict(context.node_config)
    arrays = {name: array.numpy() for name, array in msg.content[protocol.ARRAYS].items()}
    reply = trainer_client(node_config).request(
        kind, dict(msg.content[protocol.CONFIG]), dict(context.run_config), arrays
    )
    # The same records the local path replies with: evaluate returns its scalars only.
    content = {protocol.METRICS: MetricRecord(reply.metrics)}
    if kind == protocol.TRAIN:
        content[protocol.ARRAYS] = ArrayRecord(
            {name: Array(np.ascontiguousarray(value)) for name, value in reply.arrays.items()}
        )
        content[protocol.NODE] = _node_record(reply.facility, node_config)
    elif reply.evaluation is not None:  # the central evaluation on the test set (eval.at names this facility)
        content[protocol.EVALUATION] = ConfigRecord({protocol.EVALUATION_RESULT: json.dumps(reply.evaluation)})
    return Message(content=RecordDict(content), reply_to=msg)


def describe_node(msg: Message, context: Context) -> Message:
    """The facility, as the trainer knows it from the shard it serves."""
    node_config = dict(context.node_config)
    facility = trainer_client(node_config).facility()
    return Message(content=RecordDict({protocol.NODE: _node_record(facility, node_config)}), reply_to=msg)


def _node_record(facility: str, node_config: dict) -> ConfigRecord:
    return ConfigRecord(NodeInfo(facility, remaining_walltime(node_config)).to_record())
