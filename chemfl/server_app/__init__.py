"""The ServerApp: owns the global adapter, runs the strategy, evaluates centrally, writes outputs."""

from chemfl.server_app.app import app

__all__ = ["app"]
