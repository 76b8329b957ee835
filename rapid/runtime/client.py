"""How the frontend talks to an engine core: in-process (hybrid) or over ZeroMQ (rapid, disagg)."""

from __future__ import annotations

import abc
import logging

from rapid.config import EngineConfig
from rapid.protocol import AddRequest, RequestDelta

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine (a named process) died; in-flight requests cannot finish."""


class EngineClient(abc.ABC):
    @abc.abstractmethod
    def add_request(self, msg: AddRequest) -> None:
        """Enqueue a request; ValueError if it can never run (checked before anything is scheduled)."""

    @abc.abstractmethod
    def abort(self, request_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        """Output produced since the last call (blocks until some arrives or the timeout passes)."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...


class InprocClient(EngineClient):
    """Mode 'hybrid': the engine core lives in this process; get_deltas runs one engine step."""

    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids):
        from rapid.runtime.engine_core import EngineCore

        self.core = EngineCore(config, tokenizer, eos_token_ids)
        self._pending: list[RequestDelta] = []

    def add_request(self, msg: AddRequest) -> None:
        self.core.add_request(msg)

    def abort(self, request_ids: list[str]) -> None:
        self._pending.extend(self.core.abort(request_ids))

    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        out, self._pending = self._pending, []
        if self.core.has_unfinished():
            out.extend(self.core.step())
        return out

    def get_stats(self):
        return self.core.stats()

    def shutdown(self) -> None:
        """Drop the engine and give its GPU memory back (weights, KV pool, graph pools)."""
        if self.core is None:
            return
        device = self.core.device
        self.core = None
        import gc

        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def make_client(config: EngineConfig, tokenizer, eos_token_ids) -> EngineClient:
    if config.mode == "hybrid":
        return InprocClient(config, tokenizer, eos_token_ids)
    from rapid.runtime.mp_client import RapidClient  # rapid and disagg: the same processes and protocol

    return RapidClient(config, tokenizer, eos_token_ids)
