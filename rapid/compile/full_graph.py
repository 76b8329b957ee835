"""Whole CUDA graphs for prefill and mixed batches: one graph per token bucket, attention inside it.

The alternative to compile/piecewise.py when every attention call of a batch is one graph-safe launch: the
Triton backend with prefill_attention="paged" (rapid/attention/paged_prefill.py), with the decodes of a mixed
batch passed as one-token sequences. A step copies its tokens, positions and metadata into static buffers padded
to its bucket and replays one graph: no eager attention between pieces, so no host work per layer.

Buckets, measured: a step pays for its bucket's tokens, and on the H200 (bench/results/session19/) the cost of a
step is not smooth in its tokens. Some sizes cost more than larger ones (448 tokens 15.4 ms, 480 11.7; 1088 28.8,
1216 27.9), and with the x1.5/x2 buckets a step of 128-2048 tokens paid 8-13% more than its own size on average. So
the runner captures a fine set of candidates (every 32 tokens to 1024, then every 128, 256, 512), times each
graph once captured, and keeps only the sizes that no larger size beats by over 2% (`undominated`): padding then
never costs more than the bucket it skipped. (It times the graphs with no sequences, so on the GEMMs'
cost; bench/graph_buckets.py's curve includes a prompt's attention.)

Padding: tokens past the batch's own carry slot -1 (no KV write) and belong to no sequence (their rows are
computed and thrown away; rows never mix); sequence rows past the batch's own have no query tokens and context 0.

On the H200 (bench/results/session18/), serving hybrid at 44 req/s, a mixed step took 15.3 ms of device time here
against 15.7 piecewise; at 50 req/s the decode stream waited 0.05 s of the run for the host after mixed steps,
against 1.88 s piecewise. On the CPU the graph body runs eagerly through
Triton's interpreter (tests/test_full_graph.py) and equals the reference forward.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from rapid.attention.metadata import AttentionMetadata
from rapid.compile.buckets import PRUNE_MARGIN, candidate_buckets, undominated
from rapid.compile.cuda_graphs import capture_pieces

logger = logging.getLogger(__name__)


class MixedBatchBuffers:
    """The static inputs a graph reads: tokens, positions and attention metadata, padded."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, max_seq_len: int, device: torch.device):
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)  # [S+1]
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)  # [S]
        self.block_tables = torch.zeros(max_seqs, max_blocks, dtype=torch.int32, device=device)  # [S, W]
        self.max_seq_len = max_seq_len

    def fits(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return (num_tokens <= self.input_ids.shape[0] and meta.num_seqs <= self.seq_lens.shape[0]
                and meta.block_tables.shape[1] <= self.block_tables.shape[1])

    def meta(self, T: int) -> AttentionMetadata:
        """What the graph of bucket T reads: every sequence row a 'prefill' row (decodes have one query token)."""
        return AttentionMetadata(slot_mapping=self.slot_mapping[:T], query_start_loc=self.query_start_loc,
                                 seq_lens=self.seq_lens, block_tables=self.block_tables, num_decodes=0,
                                 max_seq_len=self.max_seq_len)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """Copy a batch in (device to device, no host sync); the rest is padding."""
        T, S = input_ids.shape[0], meta.num_seqs
        self.input_ids[:T].copy_(input_ids, non_blocking=True)
        self.positions[:T].copy_(positions, non_blocking=True)
        self.slot_mapping[:T].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[T:].fill_(-1)
        self.query_start_loc[: S + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.query_start_loc[S + 1:].fill_(T)  # padding sequences: no query tokens
        self.seq_lens[:S].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[S:].zero_()
        self.block_tables[:S, : meta.block_tables.shape[1]].copy_(meta.block_tables, non_blocking=True)


class FullGraphRunner:
    """One CUDA graph of the whole model forward per token bucket, for batches with prefill chunks."""

    def __init__(self, model, kv_pool: torch.Tensor, max_tokens: int, max_seqs: int, max_model_len: int,
                 block_size: int, *, capture: bool = True, progress: bool = True, sizes: list[int] | None = None):
        self.model, self.kv_pool = model, kv_pool
        # sizes: a benchmark's own (kept as given); else the candidates, pruned by their measured cost once captured
        self.buckets = sorted(set(sizes)) if sizes is not None else candidate_buckets(max_tokens)
        self.bucket_ms: dict[int, float] = {}  # each captured graph's replay time (before pruning)
        n = self.buckets[-1]
        self.buffers = MixedBatchBuffers(n, max_seqs, -(-max_model_len // block_size), max_model_len, kv_pool.device)
        self.out = torch.zeros(n, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype,
                               device=kv_pool.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0
        self.num_replays = 0  # batches run through a graph (tests and logs check the graphs are used)
        if capture:
            self._capture(progress)
            if sizes is None:
                self._keep_undominated()

    def body(self, T: int) -> None:
        """The captured work of bucket T: the forward over the static buffers into self.out."""
        b = self.buffers
        self.out[:T].copy_(self.model(b.input_ids[:T], b.positions[:T], self.kv_pool, b.meta(T)))  # [T, hidden]

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        from tqdm import tqdm

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for T in tqdm(sorted(self.buckets, reverse=True), desc="capturing prefill/mixed CUDA graphs (whole)",
                      disable=not progress, leave=False):
            # warmed up outside the capture first (no sequences: nothing written)
            (self.graphs[T],) = capture_pieces([lambda: self.body(T)], pool)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d whole prefill/mixed CUDA graphs (up to %d tokens) in %.1fs", len(self.graphs),
                    self.buckets[-1], self.capture_s)

    def _keep_undominated(self) -> None:
        """Time every graph (the best of three replays after one, CUDA events: the best is the least disturbed by
        another process capturing at the same time; no sequences, so attention reads nothing and the GEMMs set
        the cost) and drop the buckets a larger one beats by more than PRUNE_MARGIN."""
        for T, graph in self.graphs.items():
            graph.replay()
            times = []
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            self.bucket_ms[T] = min(times)
        kept = undominated(self.bucket_ms, PRUNE_MARGIN)
        self.graphs = {T: self.graphs[T] for T in kept}
        logger.info("kept %d of %d whole-graph token buckets (the rest cost more than a larger one): %s",
                    len(kept), len(self.buckets), kept)
        self.buckets = kept

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return meta.num_prefills > 0 and self.buffers.fits(meta, num_tokens)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Prefill or mixed batch -> hidden [T, hidden] (a view of a static buffer, valid until the next run)."""
        T = input_ids.shape[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, T)]
        self.buffers.load(input_ids, positions, meta)
        if self.graphs:
            self.graphs[bucket].replay()
            self.num_replays += 1
        else:  # not captured (the CPU): the same work, eagerly
            self.body(bucket)
        return self.out[:T]
