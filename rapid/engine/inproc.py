"""Mode 'hybrid': the engine core and its one executor in the user's process.

The executor is the same DecodeLoop the decode worker of mode 'rapid' runs; every prefill batch is
placed in its steps (hybrid batching). Each `get_deltas` call runs one forward pass.
"""

from __future__ import annotations

import logging
import os
import time

from rapid.config import EngineConfig
from rapid.core.placement import DECODE
from rapid.engine.client import EngineClient
from rapid.engine.core import EngineCore
from rapid.engine.interrupts import interrupts_deferred
from rapid.protocol.engine import AddRequest, RequestDelta, Stats

logger = logging.getLogger(__name__)


class InprocWorkers:
    """The decode executor in this process: messages are calls, a poll is one step."""

    def __init__(self, loop):
        self.loop = loop  # rapid.worker.decode_loop.DecodeLoop
        self.pending: list = []  # answers produced by `send` (Dropped)

    def send(self, lane: str, msg) -> None:
        if lane != DECODE:
            raise RuntimeError(f"mode 'hybrid' has no {lane} worker; the placement sent {type(msg).__name__} there")
        answer = self.loop.handle(msg)
        if answer is not None:
            self.pending.append(answer)

    def poll(self) -> list:
        out, self.pending = self.pending, []
        if self.loop.has_work():
            out += self.loop.step()
        else:
            self.loop.note_no_work()
        return out


class HybridExecutor:
    """Mode hybrid's model and its one executor in this process (the user's, or the hybrid engine process of
    rapid.engine.core_process): what the engine core drives, as `workers`."""

    def __init__(self, config: EngineConfig, eos_token_ids):
        from rapid.worker.decode_loop import DecodeLoop
        from rapid.worker.model_setup import ModelSetup

        self.setup = ModelSetup(config, "hybrid", shared=False)
        runner = self.setup.make_runner(tuple(eos_token_ids))
        self.workers = InprocWorkers(DecodeLoop(runner, self.setup.config, eos_token_ids))

    @property
    def allowed_bytes(self) -> int:
        """The torch memory its KV sizing allows this process."""
        return self.setup.allowed_bytes.get("hybrid", 0)

    def busy(self) -> bool:
        """Steps to run or answers to deliver (a core that waits on sockets must not sleep: nothing would wake it)."""
        return bool(self.workers.pending) or self.workers.loop.has_work()

    def close(self) -> None:
        """Drop the executor (its runner holds the model, the KV pool and the CUDA graphs), then the arena."""
        self.workers = None
        self.setup.close()


class InprocClient(EngineClient):
    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids):
        from rapid.worker.memory import check_process_memory, max_reserved_bytes

        t0 = time.perf_counter()
        self.executor = HybridExecutor(config, eos_token_ids)
        self.setup = self.executor.setup
        check_process_memory(f"hybrid engine (pid {os.getpid()})", max_reserved_bytes(self.setup.device),
                             self.executor.allowed_bytes)
        self.core = EngineCore(config, tokenizer, eos_token_ids, self.executor.workers, self.setup.num_blocks)
        self.num_blocks = self.core.num_blocks
        self.max_num_seqs = self.core.config.scheduler.max_num_seqs
        self._pending: list[RequestDelta] = []
        logger.info("hybrid engine ready in %.1fs: %d KV blocks of %d tokens on %s, max_num_seqs %d",
                    time.perf_counter() - t0, self.num_blocks, config.cache.block_size, self.setup.device,
                    self.max_num_seqs)

    def add_request(self, msg: AddRequest) -> None:
        self.check_health()
        with interrupts_deferred():
            self.core.add_request(msg)

    def abort(self, request_ids: list[str]) -> None:
        if self.core is None:  # shut down: its requests ended with it (a stream closed late, at exit say)
            return
        with interrupts_deferred():
            self._pending.extend(self.core.abort(request_ids))

    def get_deltas(self, timeout_s: float | None = None) -> list[RequestDelta]:
        self.check_health()
        out, self._pending = self._pending, []
        if self.core.has_unfinished():
            try:
                with interrupts_deferred():  # a step cut in half would leave its requests waiting for good
                    out.extend(self.core.step())
            except KeyboardInterrupt:  # held back until the step ended: its output goes out with the next call
                self._pending = out + self._pending
                raise
        return out

    def get_stats(self) -> Stats:
        self.check_health()
        return self.core.get_stats()

    def set_token_budget(self, max_num_batched_tokens: int) -> None:
        self.check_health()
        self.core.set_token_budget(max_num_batched_tokens)

    def check_health(self) -> None:
        if self.core is None:
            from rapid.engine.client import EngineDeadError

            raise EngineDeadError("the engine was shut down")

    def shutdown(self) -> None:
        """Drop the engine and give its memory back (weights, KV pool, graph pools)."""
        if self.core is None:
            return
        device = self.setup.device
        self.core = None
        self.executor.close()
        self.executor = self.setup = None  # nothing here may keep the model alive
        import gc

        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
