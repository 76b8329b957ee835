"""CUDA graphs for decode steps (cuda_graphs.py) and for prefill/mixed batches (piecewise.py; or full_graph.py,
whole graphs, with prefill_attention="paged"), over the model's own pieces, compiled with
LlamaModel.compile_pieces. Importing the package imports no torch (compile/buckets.py is plain Python)."""

__all__ = ["prepare_model", "warm_up"]


def prepare_model(model, kv_pool, config, decode_graphs: bool, prefill_graphs: bool) -> list:
    """On CUDA without enforce_eager: compile the non-attention work, then capture the bucketed decode
    graphs and/or the prefill/mixed graphs (whole with the paged prefill attention, else piecewise). Returns the
    graph runners (ModelRunner tries them in order); [] on the CPU or with enforce_eager."""
    import logging
    import time

    if kv_pool.device.type != "cuda":
        return []
    model.use_gemv(True)  # one token's products: the Triton GEMV beats cuBLAS at every Llama-3.1-8B shape
    if config.enforce_eager:
        return []
    t0 = time.perf_counter()
    model.compile_pieces()  # dynamic="tokens"
    sched = config.scheduler  # warm up on the largest batch this role runs: the fused kernels keep its settings
    warm_up(model, kv_pool, sched.max_num_batched_tokens if prefill_graphs else sched.max_num_seqs,
            sched.max_model_len)
    logging.getLogger(__name__).info("torch.compile warm-up took %.1fs", time.perf_counter() - t0)
    runners = []
    if decode_graphs:
        from rapid.compile.cuda_graphs import DecodeGraphRunner

        runners.append(DecodeGraphRunner(model, kv_pool, sched.max_num_seqs, config.cache.block_size,
                                         sched.max_model_len))
    # whole graphs only when every attention call of a batch is one graph-safe launch (Triton, paged prefill)
    paged = getattr(model.layers[0].self_attn.backend, "paged_prefill", False)
    if prefill_graphs and paged:
        from rapid.compile.full_graph import FullGraphRunner

        runners.append(FullGraphRunner(model, kv_pool, sched.max_num_batched_tokens, sched.max_num_seqs,
                                       sched.max_model_len, config.cache.block_size))
    elif prefill_graphs:
        from rapid.compile.piecewise import PiecewiseGraphRunner

        runners.append(PiecewiseGraphRunner(model, kv_pool, sched.max_num_batched_tokens))
    return runners


def warm_up(model, kv_pool, tokens: int, max_len: int) -> None:
    """Run a forward of `tokens` tokens, then one of a single token, so compilation happens at start.

    The first size matters: Inductor tunes a fused kernel's launch settings (block size, warps) on its first
    launch and keeps them for every later token count, so warm up with the largest batch the graphs will run.
    On the H200 a 16-token warm-up left a 2048-token step's SiLU-and-mul at 2.15 ms and its rope at 1.21 ms,
    against 1.36 and 0.56 after a 2048-token one (bench/results/session33/). The tokens form prompts of at most
    max_len (positions stay inside the rope table); every slot is -1, so nothing is written to the KV pool.
    """
    import torch

    from rapid.attention.metadata import prefill_lens, write_nothing_metadata

    dev = kv_pool.device
    lens = prefill_lens(max(tokens, 2), max_len)
    with torch.inference_mode():
        for seq_lens, decodes in ((lens, 0), ([1], 1)):
            n = sum(seq_lens)
            meta = write_nothing_metadata(seq_lens, decodes, max(seq_lens), kv_pool.shape[3], dev)
            positions = torch.cat([torch.arange(k, device=dev) for k in seq_lens])
            model(torch.zeros(n, dtype=torch.int64, device=dev), positions, kv_pool, meta)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
