"""Every message that crosses a process boundary, one module per boundary (msgspec Structs, no pickle):

- `api`: rapid.client <-> rapid.server (public: the names below are re-exported here)
- `engine`: the frontend (LLM, server) <-> the engine core
- `worker`: the engine core <-> the prefill and decode workers

Importing this package loads no torch.
"""

from rapid.protocol.api import (
    CancelRequest, ChatRequest, ClientMessage, Completion, Delta, ErrorReply, GenerateRequest, ServerMessage,
)

__all__ = ["CancelRequest", "ChatRequest", "ClientMessage", "Completion", "Delta", "ErrorReply", "GenerateRequest",
           "ServerMessage"]
