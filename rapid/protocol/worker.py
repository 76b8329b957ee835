"""Messages between the engine core and the workers (and a child's start-up arguments): msgspec Structs.

Only ids, token ids, block ids and handles cross this boundary: the KV itself never moves (rapid)
or moves GPU to GPU (disagg).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from rapid.config import EngineConfig
from rapid.params import SamplingParams
from rapid.protocol.engine import Shutdown


class ArenaHandle(msgspec.Struct, frozen=True):
    """How another process maps a shared arena (rapid.worker.arena)."""

    kind: str  # "shm" | "cuda"
    nbytes: int
    shm_name: str = ""
    cuda_args: list | None = None  # what torch.UntypedStorage._new_shared_cuda takes


class SeqWork(msgspec.Struct, array_like=True):
    """One sequence's share of a forward pass: compute KV for token_ids at positions start_pos..."""

    request_id: str
    token_ids: list[int]  # the new tokens (a prefill chunk, or the last sampled token)
    start_pos: int
    block_ids: list[int]
    sample: bool  # this chunk ends the sequence: sample the next token
    params: SamplingParams | None = None
    step_index: int = 0  # tokens already generated (seeds per-step noise)
    prompt_token_ids: list[int] = []  # for penalties and prompt logprobs
    output_token_ids: list[int] = []


class SampledToken(msgspec.Struct, array_like=True):
    request_id: str
    token_id: int
    logprob: float
    top_logprobs: dict[int, float] | None = None
    rank: int = 0  # 1-based rank of token_id in the full distribution (0: logprobs not asked for)
    # params.prompt_logprobs: per prompt token after the first, {token: logprob} (the prompt token and the
    # top-N) and the prompt token's rank; sent with the request's first sampled token
    prompt_logprobs: list[dict[int, float]] | None = None
    prompt_ranks: list[int] | None = None


# ---------------------------------------------------------------- workers <-> engine core
class WorkerReady(msgspec.Struct, tag=True):
    """A process's ready handshake; the owner worker also publishes the shared arena."""

    name: str
    pid: int
    arena: ArenaHandle | None = None
    num_blocks: int = 0
    max_num_seqs: int = 0  # the core: max_num_seqs as fitted to the KV pool
    max_reserved_bytes: int = 0  # torch.cuda.max_memory_reserved() once ready (graphs captured); 0 on the CPU
    allowed_bytes: dict[str, int] = {}  # owner on CUDA: process name -> torch bytes its KV sizing allows it


class PrefillBatch(msgspec.Struct, tag=True):
    batch_id: int
    work: list[SeqWork]
    # an inline batch: the step size the core planned it in (decode rows included: the placement's budget when it
    # sized the step, Placement.bounds_step, else the core's); the decode executor may run queued batches in one step
    # within all their sizes. 0: never
    max_step_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """The batch's prompt tokens, every chunk's."""
        return sum(len(w.token_ids) for w in self.work)


class DeviceTime(msgspec.Struct):
    """One step's time on its worker's device stream (events; rapid/worker/device_timer.py) and the stream's
    idle time before it. kind: "decode" (decode rows only), "mixed" (decode rows and prompt tokens), "inline"
    (prompt tokens only, in the decode worker), or the prefill worker's name ("prefill", "prefill2")."""

    kind: str
    busy_s: float
    idle_s: float
    eager: bool = False  # outside the worker's CUDA graphs, though it captured some (no graph fits the batch)


class PrefillDone(msgspec.Struct, tag=True):
    """Written KV is complete (stream synchronised) when this is sent; sampled = the sequences that finished."""

    batch_id: int
    sampled: list[SampledToken]
    t_start: float
    t_end: float
    num_tokens: int = 0  # tokens the batch computed
    host_s: float = 0.0  # a prefill worker: time to enqueue the batch's forward pass and sampling (host work)
    idle_gap_s: float = 0.0  # a prefill worker: time since its previous batch ended (waiting for this one)
    device: DeviceTime | None = None  # a prefill worker's batch, or an inline batch that had no decode rows
    # an inline batch that shared its step with others: the step's prompt tokens on the first batch's answer, 0 on
    # the rest (the step is learned once); None: the batch had its step to itself
    step_tokens: int | None = None


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
    device: DeviceTime | None = None  # the whole step (its inline prompt tokens included)
    after_idle: bool = False  # the first step after the executor had nothing resident: its device wait is no overhead



@dataclass
class WorkerArgs:
    """What a spawned process is given (msgspec-encoded on its stdin, never pickle)."""

    name: str
    config: EngineConfig
    endpoints: dict[str, str]
    log_path: str
    log_level: int
    eos_token_ids: tuple[int, ...]
    arena: ArenaHandle | None = None  # the arena to map (rapid prefill worker) or the peer's (disagg decode)
    num_blocks: int = 0  # blocks in that arena's KV pool
    device: str | None = None  # this process's device (disagg: prefill cuda:0, decode cuda:1)
    peer_num_blocks: int = 0  # core, disagg: blocks in the decode pool


def encode_args(args: WorkerArgs) -> bytes:
    return msgspec.msgpack.encode(args)


def decode_args(raw: bytes) -> WorkerArgs:
    return msgspec.msgpack.decode(raw, type=WorkerArgs)


WorkerResult = PrefillDone | DecodeStep | Dropped | Transferred
PrefillInput = PrefillBatch | Shutdown
DecodeInput = StartDecode | GrantBlocks | StopDecode | PrefillBatch | Shutdown
