"""Each step's time on the device and the device's idle time before it, read from events recorded on the
worker's stream (CUDA events on a GPU; on the CPU, where a step runs while it is launched, the host clock).

Recording an event does not wait for the device; `read` is called once the step's results were read back,
so the events are complete and reading them waits for nothing. This is what says where an engine's time goes
between its kernels: the sum of busy time against the run's elapsed time, and the idle time between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


class HostEvent:
    """A CPU stand-in for torch.cuda.Event: the host clock when recorded (the CPU runs a step as it is launched)."""

    def __init__(self):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1e3  # ms, as torch.cuda.Event.elapsed_time


@dataclass
class Span:
    """One step's events: the previous step's end on this stream (None for the first), its start and end."""

    prev_end: object | None
    start: object
    end: object | None = None


class DeviceTimer:
    """The events of one worker's steps, on its one stream; `event_factory` stands in for CUDA events in tests."""

    def __init__(self, device: torch.device, event_factory=None):
        if event_factory is None:
            event_factory = (lambda: torch.cuda.Event(enable_timing=True)) if device.type == "cuda" else HostEvent
        self._event = event_factory
        self._last_end = None

    def begin(self) -> Span:
        """Before a step's first device work is enqueued."""
        start = self._event()
        start.record()
        return Span(self._last_end, start)

    def finish(self, span: Span) -> None:
        """After the step's last device work (its sampling and copies to the host) is enqueued."""
        span.end = self._event()
        span.end.record()
        self._last_end = span.end

    @staticmethod
    def read(span: Span) -> tuple[float, float]:
        """(busy_s, idle_s): the step's device time, and the device's wait between the previous step and it."""
        span.end.synchronize()
        busy = span.start.elapsed_time(span.end) / 1e3
        idle = max(0.0, span.prev_end.elapsed_time(span.start) / 1e3) if span.prev_end is not None else 0.0
        return busy, idle


__all__ = ["DeviceTimer", "HostEvent", "Span"]
