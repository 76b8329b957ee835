"""Messages between the frontend (LLM, server) and the engine core: msgspec Structs, msgpack-encoded.

A message is a tagged Struct; the unions below are what each receiver decodes. Unknown or malformed
bytes raise msgspec.DecodeError / ValidationError, which receivers log and drop.
"""

from __future__ import annotations

import msgspec

from rapid.params import SamplingParams

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
    new_logprob_ranks: list[int] | None = None  # rank of each new token in its distribution (with new_logprobs)
    prompt_logprobs: list[dict[int, float]] | None = None  # prompt tokens 1.. (in the request's first delta)
    prompt_logprob_ranks: list[int] | None = None
    # when the scheduler first put the request in a batch (0.0: not yet, or a core that does not say); the first
    # delta that carries it may have nothing else in it (`is_empty`): it tells metrics the request left the queue
    first_scheduled_time: float = 0.0
    # the scheduler preempted the request (recompute): it waits again, so metrics count it waiting (as vLLM) until
    # a delta without the flag says a batch took it again; both deltas may be otherwise empty (`is_empty`)
    preempted: bool = False

    @property
    def is_empty(self) -> bool:
        """No output and no end: a delta that only says the request was scheduled (first_scheduled_time)."""
        return not (self.new_token_ids or self.new_text or self.finished or self.error is not None
                    or self.prompt_logprobs is not None)


class EngineOutputs(msgspec.Struct, tag=True):
    deltas: list[RequestDelta]


class Shutdown(msgspec.Struct, tag=True):
    pass


class GetStats(msgspec.Struct, tag=True):
    pass


class SetTokenBudget(msgspec.Struct, tag=True):
    """Prefill tokens per batch from now on (a controller and benchmark lever)."""

    max_num_batched_tokens: int


class Stats(msgspec.Struct, tag=True):
    """Recent worker activity: (start, end) wall-clock intervals of prefill batches and decode steps."""

    prefill_intervals: list[tuple[float, float]]
    decode_intervals: list[tuple[float, float]]
    decode_idle_gaps_s: list[float]
    handoff_s: list[float]  # prefill end -> the request's first decode step
    prefill_tokens: list[int] = []  # tokens of each prefill interval
    prefill_host_s: list[float] = []  # per prefill interval: a prefill worker's host time (PrefillDone.host_s)
    prefill_idle_gaps_s: list[float] = []  # per prefill interval: that worker's wait for it (PrefillDone.idle_gap_s)
    decode_batch_sizes: list[int] = []  # sequences of each decode interval
    # per decode interval: (DeviceTime kind, the device's idle_s before it, its decode rows, DecodeStep.after_idle)
    decode_device_idle: list[tuple[str, float, int, bool]] = []
    num_preemptions: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_requests: int = 0  # requests the core still tracks (in any phase)
    num_restarts: int = 0  # times the engine restarted its processes after one died (every mode with engine processes)
    placement_policy: str = ""  # "static decode" (hybrid), "static prefill", "adaptive" (rapid's default)
    placement: str = ""  # the lane of the latest prefill batch: "decode" (hybrid batching), "prefill" or "prefill2"
    prefill_batches_by_lane: dict[str, int] = {}
    prefill_tokens_by_lane: dict[str, int] = {}
    prefill_batches_by_reason: dict[str, int] = {}  # since start: "lane: the placement policy's reason" -> batches
    # since start, by step kind (rapid.protocol.worker.DeviceTime): [steps, busy_s, idle_s] on the device
    device_time: dict[str, list[float]] = {}
    # since start, by step kind: steps that ran outside the worker's CUDA graphs although it captured some
    eager_steps: dict[str, int] = {}
    # since start, the decode stream's idle time before each step by transition ("decode -> mixed"; "idle -> ..."
    # for a step after the executor had nothing resident, DecodeStep.after_idle): [steps, idle_s, steps that waited
    # over 1 ms, their idle_s]
    decode_idle_totals: dict[str, list[float]] = {}
    placement_learned: dict[str, float] = {}  # the placement policy's measured costs (rapid.core.adaptive.learned)



CoreInput = AddRequest | AbortRequest | Shutdown | GetStats | SetTokenBudget
CoreOutput = EngineOutputs | Stats
