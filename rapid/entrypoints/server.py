"""The ZeroMQ server's public names (the code lives in the zmq_* modules beside this one; `rapid serve` in serve.py).

RapidServer (zmq_server): an LLM behind a ROUTER socket for rapid.client; check_address / AddressInUseError
(zmq_endpoint): which endpoints it binds and how it refuses a live one; ServerLimits (zmq_limits): its bounds.
"""

from __future__ import annotations

from rapid.entrypoints.zmq_endpoint import AddressInUseError, check_address
from rapid.entrypoints.zmq_limits import ServerLimits
from rapid.entrypoints.zmq_server import RapidServer

__all__ = ["AddressInUseError", "RapidServer", "ServerLimits", "check_address"]

