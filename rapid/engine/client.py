"""EngineClient: how a frontend (LLM, the ZeroMQ server, the benchmarks) talks to the engine core.

One interface, two implementations: the core runs in this process (`InprocClient`, mode 'hybrid') or
in its own process beside the workers (`MPClient`, modes 'rapid' and 'disagg', and 'hybrid' with
engine_process). Nothing outside the
engine touches anything else: what the server and benchmarks need (stats, the token budget, health)
is a method here.
"""

from __future__ import annotations

import abc

from rapid.protocol.engine import AddRequest, RequestDelta, Stats


class EngineDeadError(RuntimeError):
    """The engine (a named process) died; in-flight requests cannot finish."""


class EngineClient(abc.ABC):
    num_blocks: int  # KV blocks in the pool (the smaller pool in disagg)
    max_num_seqs: int  # the decode batch limit in use (fitted to the KV pool unless the user set it)

    @abc.abstractmethod
    def add_request(self, msg: AddRequest) -> None:
        """Enqueue a request; ValueError if it can never run (checked before anything is scheduled)."""

    @abc.abstractmethod
    def abort(self, request_ids: list[str]) -> None:
        """End these requests; each still ends with a finished delta (finish_reason 'abort')."""

    @abc.abstractmethod
    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        """Output produced since the last call: may wait up to timeout_s for some (in-process: runs at most one
        step and never waits)."""

    @abc.abstractmethod
    def get_stats(self) -> Stats:
        """Recent step timings, batch sizes, KV usage and preemptions."""

    @abc.abstractmethod
    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        """Change the prefill tokens per step / per launch at run time (a controller and benchmark lever)."""

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise EngineDeadError if the engine cannot serve (a process died); return otherwise."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop every process the engine started and free what it holds; idempotent."""

    def stall_reason(self) -> str | None:
        """Why the engine, not yet known dead, makes no progress now (a process of it stopped or exited), or None;
        from any thread."""
        return None

    @property
    def reaper_dir(self) -> str | None:
        """The engine's private directory, whose reaper cleans up when the owner process dies however it dies (what
        is recorded there goes too: rapid.engine.reaper.record_endpoint); None when nothing outlives the owner."""
        return None

    def stop_restarts(self) -> None:
        """The owner is stopping: from now on a process that dies ends the engine instead of restarting it (under
        systemd's control-group kill the children get the owner's SIGTERM too). Nothing to do without children."""
