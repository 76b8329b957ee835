"""LlamaModel.compile_pieces on the CPU: the compiled model equals the eager one, one compiled graph
serves every layer, and each model owns its Dynamo caches (two models compiled in one process do not
share a recompile budget)."""

import pytest
import torch

from rapid.attention import select_backend
from rapid.attention.metadata import AttentionMetadata, kv_pool_shape
from rapid.model.config import ModelConfig
from rapid.model.llama import EAGER
from rapid.model.loader import build_model
from tiny import make_tiny_model


def _model(folder):
    cfg = ModelConfig.from_folder(folder)
    model = build_model(folder, select_backend("reference", cfg, torch.device("cpu")), torch.float32,
                        torch.device("cpu"), max_positions=128)
    return model, cfg


def _prefill(model, cfg, n):
    """One sequence of n tokens from position 0 into a fresh pool -> (hidden [n, H], pool)."""
    bs = 16
    nb = -(-n // bs)
    pool = torch.zeros(kv_pool_shape(cfg.num_layers, nb + 1, bs, cfg.num_kv_heads, cfg.head_dim))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(bs, bs + n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(1, nb + 1, dtype=torch.int32)[None], num_decodes=1 if n == 1 else 0,
        max_seq_len=n, query_start_loc_host=[0, n], seq_lens_host=[n])
    ids = torch.arange(n) * 7 % cfg.vocab_size
    with torch.inference_mode():
        return model(ids, torch.arange(n), pool, meta), pool


@pytest.mark.parametrize("dynamic", ["tokens", True])
def test_compiled_equals_eager_and_compiles_are_independent(tmp_path, dynamic):
    folders = [make_tiny_model(tmp_path / "a", "llama", with_tokenizer=False, hidden_size=64, num_layers=3),
               make_tiny_model(tmp_path / "b", "qwen3", with_tokenizer=False, hidden_size=32, num_layers=3)]
    # Two entries per piece and model (T == 1, T >= 2): a recompile per layer, or one process-wide
    # cache (the second model), would exceed this limit and fail (fullgraph=True makes it an error).
    with torch._dynamo.config.patch(recompile_limit=2):
        for folder in folders:
            model, cfg = _model(folder)
            eager = {n: _prefill(model, cfg, n) for n in (1, 5, 23)}
            assert model.compile_pieces(dynamic=dynamic) is model and model.pieces != EAGER
            assert "forward" not in model.__dict__  # the model's own forward, not a patched one
            try:
                for n, (ref_h, ref_pool) in eager.items():
                    h, pool = _prefill(model, cfg, n)
                    torch.testing.assert_close(h, ref_h, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(pool, ref_pool, rtol=1e-4, atol=1e-5)
            finally:
                model.uncompile_pieces()
            assert model.pieces == EAGER


def test_compile_pieces_rejects_unknown_dynamic(tiny_llama):
    model, _ = _model(tiny_llama)
    with pytest.raises(ValueError, match="dynamic"):
        model.compile_pieces(dynamic="batch")


def test_capture_pieces_warms_every_piece_up_then_captures_each_once_in_order(monkeypatch):
    """The capture step shared by the piecewise and whole prefill graphs, with CUDA's graph calls recorded (no GPU):
    every piece runs once outside any capture, the device is synchronised, then each piece runs inside its own
    graph, in order, in the given pool."""
    import contextlib

    import torch

    from rapid.compile.cuda_graphs import capture_pieces

    log = []

    class Graph:
        pass

    @contextlib.contextmanager
    def graph(g, pool=None):
        log.append(("capture", pool))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    graphs = capture_pieces([lambda: log.append("a"), lambda: log.append("b")], pool="P")
    assert log == ["a", "b", "sync", ("capture", "P"), "a", ("capture", "P"), "b"]
    assert len(graphs) == 2 and all(isinstance(g, Graph) for g in graphs)


def test_decode_graphs_pick_cublaslt_for_mid_batches_and_put_the_choice_back(monkeypatch):
    """Batches 32-96 capture cuBLASLt's GEMMs (faster there on the H200), the rest cuBLAS; the process-wide choice is
    restored after each capture, also when the capture raises. (The CPU build cannot select cuBLASLt: a fake setter.)"""
    from rapid.compile import cuda_graphs

    assert [cuda_graphs.blas_library_for(b) for b in (1, 8, 16, 24, 32, 64, 96, 104, 128, 256)] == \
        ["cublas"] * 4 + ["cublaslt"] * 3 + ["cublas"] * 3
    state = ["cublas"]

    def fake(backend=None):
        if backend is not None:
            state[0] = backend
        return state[0]

    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", fake)
    with cuda_graphs.preferred_blas("cublaslt"):
        assert state[0] == "cublaslt"
    assert state[0] == "cublas"
    with pytest.raises(RuntimeError), cuda_graphs.preferred_blas("cublaslt"):
        raise RuntimeError("capture failed")
    assert state[0] == "cublas"


def test_warm_up_splits_its_tokens_into_prompts_that_fit_and_writes_nothing(tiny_llama, monkeypatch):
    """warm_up's first forward has the token budget's size (the fused kernels keep the settings tuned on it), as
    prompts no longer than max_len: a budget above max_model_len would index past the rope table."""
    from rapid.compile import warm_up

    model, cfg = _model(tiny_llama)  # rope table of 128 positions
    pool = torch.randn(kv_pool_shape(cfg.num_layers, 4, 16, cfg.num_kv_heads, cfg.head_dim))
    before = pool.clone()
    calls = []
    forward = type(model).forward

    def recording(self, ids, positions, kv_pool, meta):
        calls.append((ids.shape[0], int(positions.max()), meta.seq_lens.tolist(), meta.num_decodes))
        return forward(self, ids, positions, kv_pool, meta)

    monkeypatch.setattr(type(model), "forward", recording)
    warm_up(model, pool, tokens=300, max_len=128)
    assert calls == [(300, 127, [128, 128, 44], 0), (1, 0, [1], 1)]
    assert torch.equal(pool, before)
    calls.clear()
    warm_up(model, pool, tokens=1, max_len=128)  # a single-sequence decode worker still compiles the T >= 2 graph
    assert calls == [(2, 1, [2], 0), (1, 0, [1], 1)]
