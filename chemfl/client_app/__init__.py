"""The ClientApp (component `chemfl.client_app.app:app`): trains the received global adapter on
this facility's shard and replies with the adapter tensors and a handful of scalars. No text, token
ids or data statistics leave the node."""
