"""The prefill batches sent to the lanes and not yet answered: which lane may take another. Plain Python."""

from __future__ import annotations

from dataclasses import dataclass

from rapid.core.placement import DECODE, PREFILL_LANES
from rapid.core.request import Request

# prefill batches the decode executor holds at once: one in its running step, the next waiting for its next step.
# With one, a chunk could join only a step launched after the core had seen the last one come back: in rapid's
# decode worker, which launches a step before it reads the one before back, every other step carried no prompt
# tokens and a prompt queued behind a chunk waited a step more than in hybrid (TTFT p50 +9-15 ms in session 20)
DECODE_LANE_DEPTH = 2


@dataclass
class InFlight:
    """A prefill batch sent to a lane and not yet answered."""

    batch_id: int
    chunks: list[tuple[Request, int]]  # (request, tokens of it in this batch)


class InFlightBatches:
    """Per lane, its batches in flight (oldest first), and the requests with a chunk in one of them. The prefill
    workers take one batch at a time between them (they share the prefill side); the decode executor
    DECODE_LANE_DEPTH."""

    def __init__(self):
        self.by_lane: dict[str, list[InFlight]] = {}
        self.request_ids: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.by_lane)

    def add(self, lane: str, batch: InFlight) -> None:
        self.by_lane.setdefault(lane, []).append(batch)
        self.request_ids.update(r.request_id for r, _ in batch.chunks)

    def pop(self, batch_id: int) -> tuple[str, list[tuple[Request, int]]]:
        """The answered batch's lane and chunks; ValueError for a batch not in flight."""
        for lane, batches in self.by_lane.items():
            for i, batch in enumerate(batches):
                if batch.batch_id == batch_id:
                    del batches[i]
                    if not batches:
                        del self.by_lane[lane]
                    self.request_ids.difference_update(r.request_id for r, _ in batch.chunks)
                    return lane, batch.chunks
        raise ValueError(f"PrefillDone for batch {batch_id}, which is not in flight")

    def busy(self, lane: str) -> bool:
        return lane in self.by_lane

    @property
    def beside(self) -> bool:
        """A batch is in flight on a prefill worker."""
        return any(lane in self.by_lane for lane in PREFILL_LANES)

    def lane_free(self, lane: str) -> bool:
        if lane in PREFILL_LANES:
            return not self.beside
        return len(self.by_lane.get(DECODE, ())) < DECODE_LANE_DEPTH
