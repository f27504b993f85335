"""Flower glue for the ClientApp: messages in, training or evaluation, messages out.

Two paths, chosen by the node config. With `trainer = "unix:/path/to/socket"` (the launcher's
per-job layout) the ClientApp is a relay: it forwards the message's arrays and task to the
facility trainer, a long-lived data-parallel process group that keeps the model loaded, and
replies with what it returns; on that path this process imports neither torch nor transformers,
so Flower's per-message ClientApp start costs well under a second. Without it (simulation, the
per-GPU layout) the model is loaded and trained in this process (`chemfl.client_app.local`).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from chemfl import protocol

app = ClientApp()


def _relaying(context: Context) -> bool:
    return protocol.NodeConfig.TRAINER in context.node_config


@app.train()
def train(msg: Message, context: Context) -> Message:
    if _relaying(context):
        from chemfl.client_app import relay

        return relay.forward(protocol.TRAIN, msg, context)
    from chemfl.client_app import local

    return local.train(msg, context)


@app.evaluate()
def evaluate_node(msg: Message, context: Context) -> Message:
    if _relaying(context):
        from chemfl.client_app import relay

        return relay.forward(protocol.EVALUATE, msg, context)
    from chemfl.client_app import local

    return local.evaluate_node(msg, context)


@app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """Which facility this SuperNode serves (the emulated campaign maps nodes to facilities)."""
    if _relaying(context):
        from chemfl.client_app import relay

        return relay.describe_node(msg, context)
    from chemfl.client_app import local

    return local.describe_node(msg, context)
