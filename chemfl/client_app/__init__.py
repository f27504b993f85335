"""The ClientApp: local LoRA fine-tuning on a facility's shard (filled in by the training issue)."""

from flwr.clientapp import ClientApp

app = ClientApp()
