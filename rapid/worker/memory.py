"""KV pool sizing from measured per-process memory (CUDA), never from a device-wide free-memory difference.

The engine's share of the GPU is `gpu_memory_utilization * total memory`. What the KV pool gets is that
share minus the weights and, for each process of the engine, what it needs besides: the activations of
its largest step, its CUDA graphs' memory pools and its memory outside torch (CUDA context, cuBLAS
handles, loaded kernels). Two or three workers share the GPU in mode 'rapid', so free memory says nothing about
any of them: each figure is measured in the process that runs the shapes, before the KV pool exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rapid.attention.metadata import allocate_kv_pool, prefill_lens, write_nothing_metadata
from rapid.worker.memory_check import check_process_memory, gib  # noqa: F401 (check_process_memory: as before)

ALLOC_ROUND = 2 * 2**20  # the caching allocator rounds a large allocation (the KV pool, the arena) up to this


@dataclass(frozen=True)
class ProcessMemory:
    """What one process of the engine needs on the GPU besides the weights and the KV pool (bytes)."""

    peak_activation_bytes: int  # torch peak of its largest step (forward + logits + sampler)
    graph_bytes_allowance: int  # its CUDA graphs' memory pools (captured after the KV pool exists)
    non_torch_bytes: int  # CUDA context, cuBLAS handles, loaded kernels: outside torch's allocator
    name: str = "process"

    @property
    def torch_bytes(self) -> int:
        """What torch's allocator may hold beyond the weights and the KV pool."""
        return self.peak_activation_bytes + self.graph_bytes_allowance

    @property
    def total_bytes(self) -> int:
        return self.torch_bytes + self.non_torch_bytes


@dataclass(frozen=True)
class ForwardPeaks:
    """Measured torch peaks (bytes) of the two step shapes; 0 where not measured (the CPU)."""

    prefill_bytes: int  # max_num_batched_tokens prefill tokens + logits and sampling of their rows
    decode_bytes: int  # max_num_seqs decode rows + logits and sampling


def describe(processes: list[ProcessMemory]) -> str:
    """The processes' figures on one line, for logs and errors."""
    return "; ".join(f"{p.name}: activations {gib(p.peak_activation_bytes)} + graphs {gib(p.graph_bytes_allowance)}"
                     f" + non-torch {gib(p.non_torch_bytes)}" for p in processes)


def kv_budget_bytes(total_bytes: int, utilization: float, weight_bytes: int, processes: list[ProcessMemory],
                    block_bytes: int = 1) -> int:
    """Bytes for the KV pool: int(total * utilization) - weights - every process's total_bytes.

    `utilization` is the engine's share of the whole GPU (`total_bytes`), not of its free memory.
    ValueError quoting every figure when fewer than `block_bytes` (one KV block) are left.
    """
    share = int(total_bytes * utilization)
    budget = share - weight_bytes - sum(p.total_bytes for p in processes)
    if budget < block_bytes:
        raise ValueError(
            f"gpu_memory_utilization={utilization} of {gib(total_bytes)} is {gib(share)}; after "
            f"{gib(weight_bytes)} of weights and {describe(processes) or 'no process'} it leaves "
            f"{gib(budget)}, less than one KV block ({block_bytes} bytes): no room for the KV cache "
            "(raise gpu_memory_utilization, or lower max_num_batched_tokens / max_num_seqs)"
        )
    return budget


def process_memory(name: str, peaks: ForwardPeaks, non_torch: int, prefill: bool, decode: bool,
                   graphs: bool) -> ProcessMemory:
    """The figures of a process that runs prefill and/or decode steps (and captures their graphs unless eager).

    Graph allowance: the graphs are captured after the KV pool exists, so they cannot be measured before
    it; each graph pool holds about its largest batch's activations, so the measured peak of the same
    shape stands for it (decode graphs: the decode batch; prefill/mixed graphs, whole or piecewise:
    max_num_batched_tokens).
    This over-counts a little (the peak also holds the logits and the sampler, which run outside graphs).
    """
    peaks_run = [b for b, on in ((peaks.prefill_bytes, prefill), (peaks.decode_bytes, decode)) if on]
    graph_bytes = sum(peaks_run) if graphs else 0
    return ProcessMemory(max(peaks_run, default=0), graph_bytes, non_torch, name)


# ------------------------------------------------------------------------------ measurements
def non_torch_bytes(device: torch.device) -> int:
    """Device memory in use that torch's allocator does not hold: `total - free - memory_reserved`.

    Assumes this is the engine's only CUDA process at the time (the owner worker before the prefill
    worker starts; the hybrid engine in its process): other processes already on the GPU are counted
    too, as if they were this process's, which errs on the safe side. 0 on the CPU.
    """
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def _clear_cublas_workspaces() -> None:
    """Drop cuBLAS workspaces, so that a measured step pays for its own, as the first step of a fresh process
    and each graph capture stream will. Graphs already captured in this process keep theirs: those were
    allocated during capture, in graph pools that nothing else allocates from."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _measure_peak(fn, device: torch.device) -> int:
    """Bytes torch's allocator needed beyond what it held before `fn()`: the larger of the allocated and
    the reserved peak (reserved counts the rounding into segments, which dominates for small models)."""
    torch.cuda.synchronize(device)
    _clear_cublas_workspaces()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    fn()
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - allocated, torch.cuda.max_memory_reserved(device) - reserved)


def scratch_kv_pool(model, block_size: int, num_blocks: int = 2, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tiny KV pool of the real layout and dtype (None: the model's) for profiling: [L, 2, num_blocks, BS, KVH, D],
    zeros."""
    w = model.embed_tokens.weight
    return allocate_kv_pool(model.config, num_blocks, block_size, kv_dtype or w.dtype, w.device)


def _worst_case_sampling(num_rows: int, vocab_size: int, device: torch.device):
    """A SamplingBatch that takes every sampler path (penalties, min_p, top-k and top-p, logprobs)."""
    from rapid.params import MAX_LOGPROBS, SamplingParams
    from rapid.worker.sampler import SamplingBatch

    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1,
                            frequency_penalty=0.1, presence_penalty=0.1, logprobs=MAX_LOGPROBS)
    return SamplingBatch.build([params] * num_rows, [[0]] * num_rows, [[0]] * num_rows, [0] * num_rows,
                               vocab_size, device)


def run_profile_step(model, kv_pool: torch.Tensor, lens: list[int], num_decodes: int, max_seq_len: int,
                     num_sample_rows: int) -> None:
    """One step of the given shape (any device): forward over sequences of `lens` tokens, then logits and
    worst-case sampling for `num_sample_rows` rows. Every slot is -1, so nothing is written to `kv_pool`."""
    from rapid.worker.sampler import sample

    device = kv_pool.device
    block_size = kv_pool.shape[3]
    meta = write_nothing_metadata(lens, num_decodes, max_seq_len, block_size, device)
    T = sum(lens)
    positions = torch.cat([torch.arange(n, device=device) for n in lens])  # [T]
    with torch.inference_mode():
        hidden = model(torch.zeros(T, dtype=torch.int64, device=device), positions, kv_pool, meta)  # [T, hidden]
        rows = min(num_sample_rows, T)
        logits = model.compute_logits(hidden[T - rows:])  # [rows, V] float32
        del hidden
        generator = torch.Generator(device=device).manual_seed(0)
        sample(logits, _worst_case_sampling(rows, logits.shape[1], device), generator)


def profile_forward_memory(model, device: torch.device, max_num_batched_tokens: int, max_num_seqs: int,
                           max_model_len: int, block_size: int, kv_dtype: torch.dtype | None = None) -> ForwardPeaks:
    """MEASURE (CUDA) the torch peak of this process's largest steps, over a 2-block scratch KV pool.

    prefill: max_num_batched_tokens new tokens (sequences of at most max_model_len, from position 0),
    logits and sampling for min(max_num_seqs, tokens) rows; decode: max_num_seqs single-token rows with
    the length bound at max_model_len, as the decode graphs are captured. Nothing is written to any KV.
    The peak statistics are reset when it returns, so a later max_memory_reserved() covers what follows.
    On the CPU it returns zeros without running anything (the CPU pool size is fixed, not measured).
    """
    if device.type != "cuda":
        return ForwardPeaks(0, 0)
    kv = scratch_kv_pool(model, block_size, kv_dtype=kv_dtype)  # the pool's dtype: a float8 pool's readers convert
    M = max_model_len
    lens = prefill_lens(max_num_batched_tokens, M)
    shapes = [(lens, 0, max(lens)), ([1] * max_num_seqs, max_num_seqs, M)]  # (lens, num_decodes, max_seq_len)
    prefill, decode = (_measure_peak(functools.partial(run_profile_step, model, kv, *shape, max_num_seqs), device)
                       for shape in shapes)
    kv = None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return ForwardPeaks(prefill, decode)


def max_reserved_bytes(device: torch.device) -> int:
    """This process's torch.cuda.max_memory_reserved() (since the last reset); 0 on the CPU."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0


def rounded(nbytes: int) -> int:
    """What the caching allocator reserves for one large allocation of nbytes."""
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND
