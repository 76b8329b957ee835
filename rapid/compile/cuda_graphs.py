"""CUDA graphs for decode steps.

DecodeGraphRunner captures one graph of the whole model forward per batch-size bucket
(1, 2, 4, 8, then every multiple of 8 to 256 and of 32 above: bucket_sizes). Every graph reads the same static
input buffers (token ids, positions, slot mapping, context lengths, block tables) and all graphs
share one memory pool. `run` copies a live decode batch into the buffers, pads it to the next
bucket (padding rows: slot -1, so they write no KV, and context length 0, so they read none), replays,
and returns the first rows of the graph's output buffer: a view, valid until the next replay.

The attention backend must be capturable (no host syncs, a grid fixed by host values): it says so
with a `cuda_graph_capturable = True` attribute (TritonAttention does). During capture the metadata's
max_seq_len is held at max_model_len, so the backend's launch shapes do not depend on live lengths.

The graphs capture the model as it runs: call `model.compile_pieces()` first (prepare_model does) so
they hold the compiled kernels. That compiles the model's non-attention work between two attention
calls (o_proj + residual + norm + MLP of layer i fused with the norm + qkv of layer i+1; rope runs in the
attention backend's KV store; see rapid/model/llama.py), which turns about 40 small kernels per layer into a handful. Measured gain on
an H100 at Llama-3.1-8B shapes (bench/results/kernels-h100.md): prefill of 2048 tokens 31.5k -> 37.9k
tok/s with every size symbolic, 41.4k with only the token count symbolic (dynamic="tokens", the
default; cuDNN SDPA); decode steps (CUDA graphs) batch 1 8.2 -> 6.2 ms, batch 64 12.5 -> 9.5 ms,
batch 256 34.8 -> 31.1 ms.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time

import torch

from rapid.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_pieces(pieces, pool) -> list[torch.cuda.CUDAGraph]:
    """Warm every piece up for its shapes outside any capture (compiling its kernels), then capture each, in order,
    into `pool`: one CUDA graph per piece."""
    for piece in pieces:
        piece()
    torch.cuda.synchronize()
    graphs = []
    for piece in pieces:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            piece()
        graphs.append(graph)
    return graphs


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 24, ..., 256 (step 8), then 288, 320, ... (step 32), the
    last one >= max_num_seqs. Above 256 a padded row costs little beside the batch's KV reads."""
    top = max(max_num_seqs, 1)
    candidates = [1, 2, 4, 8] + list(range(16, min(top, 256) + 8, 8)) + list(range(288, top + 32, 32))
    below = [c for c in candidates if c < max_num_seqs]
    return below + [next(c for c in candidates if c >= max(max_num_seqs, 1))]


# Decode batches whose graphs capture cuBLASLt's GEMMs instead of cuBLAS's: on the H200 the step's GEMMs took
# 3.971 / 4.081 / 4.021 / 4.231 ms with cuBLASLt at batch 32 / 48 / 64 / 96 against cuBLAS's 4.088 / 4.238 / 4.255 /
# 4.486, and longer at 8, 16, 128 and 256 (bench/results/session30/call2/gemm-shapes.md; 64 also in sessions 27 and
# 28). It was faster at 192 too (5.602 against 5.825), one point between two where it lost: not adopted.
CUBLASLT_BATCHES = (32, 96)


def blas_library_for(batch: int) -> str:
    """The BLAS library a decode graph of this batch captures its GEMMs with."""
    return "cublaslt" if CUBLASLT_BATCHES[0] <= batch <= CUBLASLT_BATCHES[1] else "cublas"


@contextlib.contextmanager
def preferred_blas(library: str):
    """torch's process-wide BLAS choice set for a capture, and put back after it."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


class DecodeGraphRunner:
    def __init__(self, model, kv_pool: torch.Tensor, max_num_seqs: int, block_size: int, max_model_len: int,
                 *, capture_sizes: list[int] | None = None, progress: bool = True, blas_by_batch: bool = True):
        """blas_by_batch: capture batches in CUBLASLT_BATCHES with cuBLASLt (else every batch with torch's default)."""
        self.blas_by_batch = blas_by_batch
        self.model = model
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_blocks = max_model_len // block_size + 1
        backend = model.layers[0].self_attn.backend if len(model.layers) else None
        self.sizes: list[int] = sorted(set(capture_sizes or bucket_sizes(max_num_seqs)))
        if not getattr(backend, "cuda_graph_capturable", False):
            logger.warning("attention backend %r is not CUDA-graph capturable: decode runs eagerly",
                           getattr(backend, "name", type(backend).__name__))
            self.sizes = []
        self.max_bs = self.sizes[-1] if self.sizes else 0
        dev = kv_pool.device
        n = max(self.max_bs, 1)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture_s = 0.0
        if self.sizes:
            self._capture(progress)

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            num_decodes=b,
            max_seq_len=self.max_model_len,  # a host bound, constant across replays
        )

    @torch.inference_mode()
    def _capture(self, progress: bool) -> None:
        from tqdm import tqdm

        t0 = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)  # warm-up/capture rows read one token of block 0 and write nothing (slot -1)
        sizes = sorted(self.sizes, reverse=True)  # largest first: smaller graphs reuse its pool memory
        for b in tqdm(sizes, desc="capturing decode CUDA graphs", disable=not progress, leave=False):
            meta = self._meta(b)
            ids, pos = self.input_ids[:b], self.positions[:b]
            library = blas_library_for(b) if self.blas_by_batch else torch.backends.cuda.preferred_blas_library()
            with preferred_blas(library):
                for _ in range(2):  # compile Triton/Inductor kernels for this shape outside the capture
                    self.model(ids, pos, self.kv_pool, meta)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.model(ids, pos, self.kv_pool, meta)
            self.graphs[b], self.outputs[b] = graph, out
        torch.cuda.synchronize()
        self.seq_lens.fill_(0)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d, max_model_len %d) in %.1fs",
                    len(sizes), self.sizes[0], self.max_bs, self.max_model_len, self.capture_s)

    def can_run(self, meta: AttentionMetadata, num_seqs: int) -> bool:
        return (
            self.max_bs > 0
            and meta.num_prefills == 0
            and 0 < num_seqs <= self.max_bs
            and meta.num_decodes == num_seqs
            and meta.slot_mapping.shape[0] == num_seqs
            and meta.max_seq_len <= self.max_model_len
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def bucket(self, num_seqs: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode-only batch -> hidden [num_seqs, hidden] (a view of the graph's output buffer)."""
        n = meta.num_seqs
        b = self.bucket(n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables, non_blocking=True)
        if b > n:  # padding rows: no KV write, no KV read (stale ids/positions are valid indices)
            self.slot_mapping[n:b].fill_(-1)
            self.seq_lens[n:b].fill_(0)
        self.graphs[b].replay()
        return self.outputs[b][:n]

