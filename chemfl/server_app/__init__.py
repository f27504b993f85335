"""The ServerApp: owns the global adapter and runs the strategy (filled in by the training issue)."""

from flwr.serverapp import ServerApp

app = ServerApp()
