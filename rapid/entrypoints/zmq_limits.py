"""ServerLimits: the bounds RapidServer enforces per client and in total (docs/reliability.md has the table).

Everything a peer can make the server hold is counted here, so one client cannot grow the server's memory or
delay the others without limit:

- a frame over `max_frame_bytes` gets an ErrorReply without being decoded (only its id is recovered, by a skip
  that builds nothing); ZeroMQ itself disconnects a peer that sends more than `hard_frame_bytes`;
- a text prompt longer than max_model_len * `max_chars_per_token` characters is refused before tokenization;
  a token-id list longer than max_model_len is refused while decoding (before its elements are read); a chat
  has at most `max_chat_messages` messages of at most 8 keys, and its text the same character bound as a prompt;
- requests read but not yet in the engine wait in a per-client queue of `max_queued_per_client` requests and
  `max_queued_bytes_per_client` bytes (`max_queued_bytes_total` over all clients); more are refused at once;
- a client has at most `max_inflight_per_client` requests in the engine; its further requests wait in its queue,
  and clients are admitted round-robin, so a flood delays another client by at most that many requests;
- replies ZeroMQ cannot take (the peer's pipe holds ZMQ_SNDHWM messages) wait in a per-client outbox of at
  most `max_reply_bytes_per_client` bytes (`max_reply_bytes_total` over all clients); a client over that bound,
  or whose replies have not moved for `reply_stall_s` seconds, is dropped: its requests are aborted, its
  queue and outbox freed, and later messages on that connection refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MiB = 1 << 20

ZMQ_SNDHWM = 256  # replies ZeroMQ queues for one peer before the server keeps them in that peer's outbox
ZMQ_RCVHWM = 64  # messages ZeroMQ queues from one peer before the server reads them
HEARTBEAT_IVL_MS = 2000  # ZMTP pings to every peer; a peer silent for HEARTBEAT_TIMEOUT_MS is disconnected
HEARTBEAT_TIMEOUT_MS = 10000
MAX_CHAT_KEYS = 8  # keys of one chat message ({'role', 'content', 'name', ...})
MAX_CHAT_KEY_CHARS = 64
MAX_REQUEST_ID_CHARS = 256  # a client_request_id comes back in every reply of its request


@dataclass(frozen=True)
class ServerLimits:
    """Per-client and total bounds of a RapidServer (all > 0); see the module docstring for what each bounds."""

    max_frame_bytes: int = 4 * MiB
    max_chars_per_token: int = 32
    max_chat_messages: int = 1024
    max_inflight_per_client: int = 64
    max_queued_per_client: int = 1024
    max_queued_bytes_per_client: int = 16 * MiB
    max_queued_bytes_total: int = 64 * MiB
    max_reply_bytes_per_client: int = 8 * MiB
    max_reply_bytes_total: int = 256 * MiB
    reply_stall_s: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"ServerLimits.{f.name} must be a number, got {type(value).__name__} {value!r}")
            if f.type == "int" and not isinstance(value, int):
                raise TypeError(f"ServerLimits.{f.name} must be an int, got {value!r}")
            if not value > 0:
                raise ValueError(f"ServerLimits.{f.name} must be > 0, got {value!r}")
        if self.max_queued_bytes_per_client < self.max_frame_bytes:
            raise ValueError(f"ServerLimits.max_queued_bytes_per_client ({self.max_queued_bytes_per_client}) must be "
                             f">= max_frame_bytes ({self.max_frame_bytes}), or no request of full size could wait")
        if self.max_queued_bytes_total < self.max_queued_bytes_per_client:
            raise ValueError(f"ServerLimits.max_queued_bytes_total ({self.max_queued_bytes_total}) must be >= "
                             f"max_queued_bytes_per_client ({self.max_queued_bytes_per_client})")
        if self.max_reply_bytes_total < self.max_reply_bytes_per_client:
            raise ValueError(f"ServerLimits.max_reply_bytes_total ({self.max_reply_bytes_total}) must be >= "
                             f"max_reply_bytes_per_client ({self.max_reply_bytes_per_client})")

    @property
    def hard_frame_bytes(self) -> int:
        """ZMQ_MAXMSGSIZE: ZeroMQ drops the connection of a peer that sends a bigger frame (no reply possible)."""
        return 4 * self.max_frame_bytes

    def max_prompt_chars(self, max_model_len: int) -> int:
        """Longest text (prompt, or a chat's contents together) tokenized at all."""
        return max_model_len * self.max_chars_per_token
