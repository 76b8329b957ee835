"""EngineCore for mode 'hybrid': one process, one worker, continuous batching with chunked prefill.

Each `step()` schedules one mixed batch (decodes first, then prefill chunks under the token
budget), runs it, samples, and returns the RequestDeltas produced.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from rapid.config import EngineConfig
from rapid.protocol import AddRequest, RequestDelta, SeqWork, Stats
from rapid.runtime.block_manager import BlockManager
from rapid.attention.metadata import allocate_kv_pool
from rapid.runtime.loading import load_model, num_kv_blocks, resolve_device
from rapid.runtime.memory import (
    ProcessMemory, check_process_memory, max_reserved_bytes, non_torch_bytes, process_memory, profile_forward_memory,
    rounded,
)
from rapid.runtime.model_runner import ModelRunner
from rapid.runtime.output_processor import OutputProcessor
from rapid.runtime.request import Request
from rapid.runtime.scheduler import ScheduledChunk, Scheduler

logger = logging.getLogger(__name__)


def chunk_work(chunk: ScheduledChunk) -> SeqWork:
    """The SeqWork a scheduled chunk asks of the model runner."""
    req = chunk.request
    start = req.num_computed_tokens
    return SeqWork(
        request_id=req.request_id,
        token_ids=req.all_token_ids[start : start + chunk.num_tokens],
        start_pos=start,
        block_ids=req.block_ids,
        sample=chunk.samples,
        params=req.params,
        step_index=len(req.output_token_ids),
        prompt_token_ids=req.prompt_token_ids,
        output_token_ids=req.output_token_ids,
    )


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer, eos_token_ids: tuple[int, ...]):
        self.config = config
        self.device = resolve_device(config)
        self.eos_token_ids = eos_token_ids
        t0 = time.perf_counter()
        model, dtype = load_model(config, self.device)
        # CUDA: what this process holds after loading, and the measured needs of its largest steps.
        self.held_bytes, self.memory_plan = measure_hybrid_memory(model, config, self.device)
        num_blocks = num_kv_blocks(config, model.config, dtype, self.device, self.held_bytes,
                                   [self.memory_plan] if self.memory_plan else [])
        kv_pool = allocate_kv_pool(model.config, num_blocks, config.cache.block_size, dtype, self.device)
        from rapid.compile import prepare_model

        graphs = prepare_model(model, kv_pool, config, decode_graphs=True, prefill_graphs=True)
        # what torch may hold at most in this process by the plan (0: no plan, nothing to check)
        self.allowed_bytes = (self.held_bytes + rounded(kv_pool.numel() * kv_pool.element_size())
                              + self.memory_plan.torch_bytes) if self.memory_plan else 0
        check_process_memory(f"hybrid engine (pid {os.getpid()})", max_reserved_bytes(self.device), self.allowed_bytes)
        self.runner = ModelRunner(model, kv_pool, config.cache.block_size, config.seed, graph_runners=graphs,
                                  eos_token_ids=eos_token_ids)
        self.blocks = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.outputs = OutputProcessor(tokenizer)
        window = 4096  # recent step timings kept for stats
        self.step_intervals: deque[tuple[float, float]] = deque(maxlen=window)
        self.step_decodes: deque[int] = deque(maxlen=window)
        self.step_prefill_tokens: deque[int] = deque(maxlen=window)
        logger.info("hybrid engine ready in %.1fs: %d KV blocks of %d tokens on %s",
                    time.perf_counter() - t0, num_blocks, config.cache.block_size, self.device)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    def add_request(self, msg: AddRequest) -> None:
        req = Request(msg.request_id, list(msg.prompt_token_ids), msg.params, self.eos_token_ids,
                      arrival_time=msg.arrival_time or time.time())
        self.scheduler.add_request(req)  # raises ValueError if it can never fit
        self.outputs.add_request(req)

    def abort(self, request_ids: list[str]) -> list[RequestDelta]:
        deltas = []
        for rid in request_ids:
            req = self.scheduler.abort_request(rid)
            if req is not None:
                deltas.append(self.outputs.delta(req, finished=True))
        return deltas

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> Stats:
        """Per-step timings: every hybrid step is both a decode interval and a prefill interval."""
        return Stats(list(self.step_intervals), list(self.step_intervals), [], [],
                     prefill_tokens=list(self.step_prefill_tokens), decode_batch_sizes=list(self.step_decodes),
                     num_preemptions=self.scheduler.num_preemptions, num_free_blocks=self.blocks.num_free_blocks,
                     num_blocks=self.blocks.num_blocks, num_requests=len(self.scheduler.requests))

    def step(self) -> list[RequestDelta]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        t0 = time.time()
        sampled = self.runner.execute([chunk_work(c) for c in sched.chunks])
        t1 = time.time()
        decodes = sched.num_decodes
        self.step_intervals.append((t0, t1))
        self.step_decodes.append(decodes)
        self.step_prefill_tokens.append(sched.num_batched_tokens - decodes)
        by_id = {c.request.request_id: c.request for c in sched.chunks}
        finished = {req.request_id for req, _ in self.scheduler.update(sched, {s.request_id: s.token_id for s in sampled})}
        deltas = []
        for tok in sampled:
            req = by_id[tok.request_id]
            matched = self.outputs.on_token(req, tok)
            if matched is not None:
                if req.request_id not in finished:
                    self.scheduler.finish(req, "stop")
                    finished.add(req.request_id)
                req.finish_reason, req.stop_reason = "stop", matched
            deltas.append(self.outputs.delta(req, finished=req.request_id in finished))
        return deltas


def measure_hybrid_memory(model, config: EngineConfig, device) -> tuple[int, ProcessMemory | None]:
    """CUDA without kv_cache_memory_bytes: (bytes torch holds in this process once the model is loaded,
    this process's measured ProcessMemory); (0, None) otherwise (the CPU, or a KV size given)."""
    if device.type != "cuda" or config.cache.kv_cache_memory_bytes is not None:
        return 0, None
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved(device)  # the weights, the rope table, anything held before
    s = config.scheduler
    peaks = profile_forward_memory(model, device, s.max_num_batched_tokens, s.max_num_seqs, s.max_model_len,
                                   config.cache.block_size)
    # one process runs both step shapes and captures both kinds of graphs (decode, piecewise)
    plan = process_memory("hybrid engine", peaks, non_torch_bytes(device), prefill=True, decode=True,
                          graphs=not config.enforce_eager)
    return held, plan
