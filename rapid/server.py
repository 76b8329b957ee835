"""Public path of the ZeroMQ server (the code lives in rapid.entrypoints.server)."""

from rapid.entrypoints.server import RapidServer, check_address, serve

__all__ = ["RapidServer", "check_address", "serve"]
