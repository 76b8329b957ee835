"""Public path of the ZeroMQ clients (the code lives in rapid.entrypoints.client; no torch is loaded)."""

from rapid.entrypoints.client import AsyncClient, Client, NoServerError, ServerError

__all__ = ["AsyncClient", "Client", "NoServerError", "ServerError"]
