"""Public path of the servers: the ZeroMQ RapidServer (code in rapid.entrypoints.zmq_*) and `rapid serve`."""

from rapid.entrypoints.serve import serve
from rapid.entrypoints.server import AddressInUseError, RapidServer, ServerLimits, check_address

__all__ = ["AddressInUseError", "RapidServer", "ServerLimits", "check_address", "serve"]
