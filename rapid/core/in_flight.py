"""The prefill batches sent to the lanes and not yet answered: which lane may take another. Plain Python."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rapid.core.placement import DECODE, PREFILL_LANES
from rapid.core.request import Request

# prefill batches the decode executor holds at once: one in its running step, and two waiting for its next step,
# which takes both when they fit its budget (DecodeLoop._take_inline). With one, a chunk could join only a step
# launched after the core had seen the last one come back (TTFT p50 +9-15 ms over hybrid in session 20). With two,
# a prompt arriving while one batch ran and one waited stayed in the core until the running one's answer, which
# comes after the worker has launched its next step: across processes a batch is in flight from the send, through
# the worker's inbox, to the answer, where in hybrid the core schedules right before the step that runs it
DECODE_LANE_DEPTH = 3
# The decode executor runs its batches in order, so a prompt's next chunk may follow one still in flight there (as
# vLLM's async scheduling does). Waiting for a chunk's answer before sending the next cost a step per chunk
# boundary in rapid's decode worker (it launches a step before reading the one before back) and hybrid's: with
# 3000-token prompts rapid's TTFT p50 ran 33 ms behind hybrid's with 98% of the prompts in mixed steps (session 22)
CHAINED_LANES = (DECODE,)
# a decode step that ran beside a prefill worker's batch for less than this share of its time is learned as neither
BESIDE_MIN_SHARE = 0.1


@dataclass
class InFlight:
    """A prefill batch sent to a lane and not yet answered."""

    batch_id: int
    chunks: list[tuple[Request, int]]  # (request, tokens of it in this batch)
    sent_at: float = field(default=0.0, compare=False)  # time.time() when the core sent it


class InFlightBatches:
    """Per lane, its batches in flight (oldest first), and the requests with a chunk in one of them. The prefill
    workers take one batch at a time between them (they share the prefill side); the decode executor
    DECODE_LANE_DEPTH."""

    def __init__(self):
        self.by_lane: dict[str, list[InFlight]] = {}
        self.requests: dict[str, tuple[str, int]] = {}  # request id -> (its lane, its tokens in flight there)
        # the prefill workers' last answered batches: (start, end, lane)
        self.beside_ended: deque[tuple[float, float, str]] = deque(maxlen=4)

    def __bool__(self) -> bool:
        return bool(self.by_lane)

    def add(self, lane: str, batch: InFlight) -> None:
        self.by_lane.setdefault(lane, []).append(batch)
        for req, n in batch.chunks:
            self.requests[req.request_id] = (lane, self.tokens_ahead(req.request_id) + n)

    def pop(self, batch_id: int, interval: tuple[float, float] | None = None) -> tuple[str, list[tuple[Request, int]]]:
        """The answered batch's lane and chunks; ValueError for a batch not in flight. `interval`: when it ran."""
        for lane, batches in self.by_lane.items():
            for i, batch in enumerate(batches):
                if batch.batch_id == batch_id:
                    if lane in PREFILL_LANES and interval is not None:
                        self.beside_ended.append((*interval, lane))
                    del batches[i]
                    if not batches:
                        del self.by_lane[lane]
                    for req, n in batch.chunks:
                        left = self.tokens_ahead(req.request_id) - n
                        if left > 0:
                            self.requests[req.request_id] = (lane, left)
                        else:
                            self.requests.pop(req.request_id, None)
                    return lane, batch.chunks
        raise ValueError(f"PrefillDone for batch {batch_id}, which is not in flight")

    def __contains__(self, request_id: str) -> bool:
        """The request has a chunk in flight."""
        return request_id in self.requests

    def tokens_ahead(self, request_id: str) -> int:
        """The request's tokens in batches not yet answered (a next chunk starts after them)."""
        return self.requests.get(request_id, ("", 0))[1]

    def can_take(self, request_id: str, lane: str) -> bool:
        """A chunk of the request may go to `lane` now: none in flight, or only on `lane`, which runs in order."""
        held = self.requests.get(request_id)
        return held is None or lane in CHAINED_LANES and held[0] == lane

    def busy(self, lane: str) -> bool:
        return lane in self.by_lane

    @property
    def beside(self) -> bool:
        """A batch is in flight on a prefill worker."""
        return any(lane in self.by_lane for lane in PREFILL_LANES)

    def beside_overlap_s(self, t_start: float, t_end: float) -> dict[str, float]:
        """Per prefill worker, how long the interval [t_start, t_end] (a decode step's) overlapped its batches: those
        that ended, and those in flight (from when they were sent). Whether a batch is in flight when a step's result
        arrives says little: a step that ran beside a batch is often read after the batch's answer (counted alone,
        it raised the decode step alone and hid its slowdown), and one in flight may have been sent as it ended."""
        ran = list(self.beside_ended)
        ran += [(b.sent_at, t_end, lane) for lane in PREFILL_LANES for b in self.by_lane.get(lane, ())]
        out: dict[str, float] = {}
        for start, end, lane in ran:
            out[lane] = out.get(lane, 0.0) + max(0.0, min(end, t_end) - max(start, t_start))
        return out

    def ran_beside(self, t_start: float, t_end: float) -> str | bool | None:
        """The prefill worker a decode step of interval [t_start, t_end] ran beside longest, or False; None when it
        ran beside one for less than BESIDE_MIN_SHARE of its time (learned as neither)."""
        overlap = self.beside_overlap_s(t_start, t_end)
        lane = max(overlap, key=overlap.get, default=None)
        share = 0.0 if lane is None else sum(overlap.values()) / max(t_end - t_start, 1e-9)
        return None if 0 < share < BESIDE_MIN_SHARE else lane if share > 0 else False

    def lane_free(self, lane: str) -> bool:
        if lane in PREFILL_LANES:
            return not self.beside
        return len(self.by_lane.get(DECODE, ())) < DECODE_LANE_DEPTH
