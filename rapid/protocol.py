"""Every message that crosses a process boundary: msgspec Structs, encoded with msgpack (never pickle).

A message is a tagged Struct; `Message` is the union that decoders accept. Unknown or malformed
bytes raise msgspec.DecodeError / ValidationError, which receivers log and drop.
"""

from __future__ import annotations

import msgspec

from rapid.runtime.shared import ArenaHandle
from rapid.sampling import SamplingParams


class SeqWork(msgspec.Struct, array_like=True):
    """One sequence's share of a forward pass: compute KV for token_ids at positions start_pos..."""

    request_id: str
    token_ids: list[int]  # the new tokens (a prefill chunk, or the last sampled token)
    start_pos: int
    block_ids: list[int]
    sample: bool  # this chunk ends the sequence: sample the next token
    params: SamplingParams | None = None
    step_index: int = 0  # tokens already generated (seeds per-step noise)
    prompt_token_ids: list[int] = []  # for penalties
    output_token_ids: list[int] = []


class SampledToken(msgspec.Struct, array_like=True):
    request_id: str
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


# ---------------------------------------------------------------- frontend <-> engine core
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = 0.0


class AbortRequest(msgspec.Struct, tag=True):
    request_ids: list[str]


class RequestDelta(msgspec.Struct, tag=True, array_like=True):
    """New output of one request since the last delta (text already detokenized)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None
    error: str | None = None  # set when the request ended because of an engine error


class EngineOutputs(msgspec.Struct, tag=True):
    deltas: list[RequestDelta]


class EngineDead(msgspec.Struct, tag=True):
    """Sent (best effort) when the engine cannot go on; every in-flight request fails with `reason`."""

    reason: str


class Shutdown(msgspec.Struct, tag=True):
    pass


class GetStats(msgspec.Struct, tag=True):
    pass


class Stats(msgspec.Struct, tag=True):
    """Recent worker activity: (start, end) wall-clock intervals of prefill batches and decode steps."""

    prefill_intervals: list[tuple[float, float]]
    decode_intervals: list[tuple[float, float]]
    decode_idle_gaps_s: list[float]
    handoff_s: list[float]  # prefill end -> the request's first decode step
    prefill_tokens: list[int] = []  # tokens of each prefill interval
    decode_batch_sizes: list[int] = []  # sequences of each decode interval
    num_preemptions: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_requests: int = 0  # requests the core still tracks (in any phase)


# ---------------------------------------------------------------- workers <-> engine core
class WorkerReady(msgspec.Struct, tag=True):
    """A process's ready handshake; the owner worker also publishes the shared arena."""

    name: str
    pid: int
    arena: ArenaHandle | None = None
    num_blocks: int = 0
    info: str = ""
    max_reserved_bytes: int = 0  # torch.cuda.max_memory_reserved() once ready (graphs captured); 0 on the CPU
    allowed_bytes: dict[str, int] = {}  # owner on CUDA: process name -> torch bytes its KV sizing allows it


class PrefillBatch(msgspec.Struct, tag=True):
    batch_id: int
    work: list[SeqWork]


class PrefillDone(msgspec.Struct, tag=True):
    """Written KV is complete (stream synchronised) when this is sent; sampled = the sequences that finished."""

    batch_id: int
    sampled: list[SampledToken]
    t_start: float
    t_end: float


class StartDecode(msgspec.Struct, tag=True):
    """Hand a prefilled request to the decode worker: its tokens so far and the blocks that hold their KV."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    block_ids: list[int]
    params: SamplingParams
    prefill_end: float = 0.0
    src_block_ids: list[int] = []  # disagg: the KV is in these prefill-pool blocks; copy it into block_ids


class GrantBlocks(msgspec.Struct, tag=True):
    request_id: str
    block_ids: list[int]  # appended to the request's block table


class StopDecode(msgspec.Struct, tag=True):
    """Drop these requests (abort, stop string, preemption); answered by Dropped."""

    request_ids: list[str]


class Transferred(msgspec.Struct, tag=True):
    """disagg: the decode worker copied these requests' KV out of the prefill pool."""

    request_ids: list[str]


class Dropped(msgspec.Struct, tag=True):
    """The decode worker no longer touches these requests' blocks."""

    request_ids: list[str]


class DecodeStep(msgspec.Struct, tag=True):
    sampled: list[SampledToken]
    finished: list[str]  # requests the worker ended itself (EOS, stop token, length) and dropped
    t_start: float
    t_end: float
    idle_gap_s: float = 0.0  # time the GPU waited on the host before this step
    handoffs: list[float] = []  # for requests stepped for the first time: prefill end -> this step


CoreInput = AddRequest | AbortRequest | Shutdown | GetStats
CoreOutput = EngineOutputs | EngineDead | Stats | WorkerReady
WorkerResult = PrefillDone | DecodeStep | Dropped | Transferred | WorkerReady
PrefillInput = PrefillBatch | Shutdown
DecodeInput = StartDecode | GrantBlocks | StopDecode | Shutdown


# ================================================================ public client <-> server
# What rapid.client.Client / AsyncClient (a DEALER socket) exchange with rapid.server.RapidServer (a ROUTER
# socket): one msgpack frame per message, tagged by class name ("type" field). Requests carry an id chosen
# by the client; every reply names it. A request ends with a Completion, a Delta with finished=True
# (stream=True) or an ErrorReply. Decoding validates the SamplingParams again (msgspec runs __post_init__).


class GenerateRequest(msgspec.Struct, tag=True):
    """A text prompt or a token-id prompt (exactly one of the two)."""

    client_request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False


class ChatRequest(msgspec.Struct, tag=True):
    """One conversation through the model's chat template."""

    client_request_id: str
    messages: list[dict[str, str]]
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    add_generation_prompt: bool = True


class CancelRequest(msgspec.Struct, tag=True):
    """Abort a request of this client; it still ends with its final Delta / Completion (finish_reason 'abort')."""

    client_request_id: str


class Delta(msgspec.Struct, tag=True):
    """New output of a streamed request since its previous Delta (the last one has finished=True)."""

    client_request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class Completion(msgspec.Struct, tag=True):
    """The whole result of a non-streamed request."""

    client_request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None


class ErrorReply(msgspec.Struct, tag=True):
    """The request was refused or failed. client_request_id is '' when the message could not be read."""

    client_request_id: str
    message: str


ClientMessage = GenerateRequest | ChatRequest | CancelRequest
ServerMessage = Delta | Completion | ErrorReply
