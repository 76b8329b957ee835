"""The split-K Triton GEMM (rapid/model/splitk_gemm.py): on the CPU through Triton's interpreter, in a subprocess (this
file run as a script: TRITON_INTERPRET=1 is read when a kernel is decorated, and other tests may have imported the
kernel's module already), against torch's products; the wrapper's launches (graph safety, grids) and refusals here in
process with the kernels stubbed out; on a GPU against torch in bf16, eager against a CUDA graph replay.

Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits; the subprocess widens them to
fp32 first (tests/test_paged_prefill.py's _fix_interpreter_bf16_dot), so the bf16 cases check the kernel.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from triton_interpreted import interpreted_results

from rapid.model.splitk_gemm import SplitKConfig

# (M, N, K, config, dtype). N = 72 and K = 200 divide no block: a short last column block, a short last K step.
# split 3 with 64-column steps: splits of 128 columns, the third one empty (its partial is zero).
SPLITS = {1: SplitKConfig(32, 32, 1, 4, 2), 3: SplitKConfig(16, 64, 3, 4, 2), 4: SplitKConfig(32, 32, 4, 2, 3)}
CASES = [(m, 72, 200, cfg, dtype) for m in (1, 5, 16, 33, 64) for cfg in SPLITS.values()
         for dtype in ("float32", "bfloat16")]
CASES += [(5, 72, 192, SplitKConfig(16, 64, 3, 4, 2), "bfloat16"),  # K % BLOCK_K == 0: the unmasked K loads
          (128, 40, 96, SplitKConfig(16, 32, 2, 4, 2), "float32")]  # the most rows


def case_name(m, n, k, cfg, dtype) -> str:
    return f"M{m} {n}x{k} {tuple(cfg)} {dtype}"


def run_cases() -> list[dict]:
    from rapid.model.splitk_gemm import splitk_gemm  # in the interpreter subprocess only

    out = []
    for i, (m, n, k, cfg, dtype) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        x, w = torch.randn(m, k, generator=g).to(dt), torch.randn(n, k, generator=g).to(dt)
        y = splitk_gemm(x, w, cfg)
        ref = x.float() @ w.float().T
        out.append({"case": case_name(m, n, k, cfg, dtype), "shape": list(y.shape), "dtype": str(y.dtype),
                    "max_err": float((y.float() - ref).abs().max()), "scale": float(ref.abs().max()),
                    "repeat_equal": bool(torch.equal(y, splitk_gemm(x, w, cfg)))})
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    return {r["case"]: r for r in interpreted_results(__file__, len(CASES))}


@pytest.mark.parametrize("case", CASES, ids=[case_name(*c) for c in CASES])
def test_splitk_gemm_equals_torch_under_the_interpreter(interpreted, case):
    m, n, _, cfg, dtype = case
    r = interpreted[case_name(*case)]
    assert r["shape"] == [m, n] and r["dtype"] == f"torch.{dtype}", r
    # float32: summation order only; bfloat16: the output's rounding (the interpreter truncates: up to one ulp)
    assert r["max_err"] <= (1e-5 if dtype == "float32" else 2**-7) * r["scale"], r
    assert r["repeat_equal"], r  # split_k > 1 included: the partials are added in one fixed order


class _Launch:
    """Stands in for a jitted kernel: records kernel[grid](*args, **kwargs) instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _no_host_reads(*_a, **_k):
    raise AssertionError("host read of device data in the wrapper (a sync; breaks CUDA-graph capture)")


def test_wrapper_launches_from_shapes_only(monkeypatch):
    """Grids and constants from the shapes and the config alone, no host read of tensor data (CUDA-graph capture,
    torch.compile), a fp32 workspace [SPLIT_K, M, N] and one reduction only with split_k > 1; tensors without data
    (FakeTensorMode, as Dynamo traces) launch the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rapid.model import splitk_gemm as sk

    gemm, reduce = _Launch(), _Launch()
    monkeypatch.setattr(sk, "_splitk_gemm_kernel", gemm)
    monkeypatch.setattr(sk, "_reduce_partials_kernel", reduce)
    for attr in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, _no_host_reads)
    x, w = torch.randn(33, 4096, dtype=torch.bfloat16), torch.randn(6144, 4096, dtype=torch.bfloat16)
    y = sk.splitk_gemm(x, w, SplitKConfig(64, 128, 1, 4, 3))
    grid, args, kw = gemm.calls[-1]
    assert y.shape == (33, 6144) and y.dtype == torch.bfloat16 and args[2] is y and not reduce.calls
    assert grid == (96, 1) and args[3:] == (33, 6144, 4096, 4096, 4096, 4096)  # M N K strides, one split of all K
    assert kw == dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, EVEN_K=True, PARTIALS=False, num_warps=4, num_stages=3)
    y = sk.splitk_gemm(x, w, SplitKConfig(128, 256, 3, 8, 4))  # 4096 / 3 -> 6 steps of 256 = 1536 columns a split
    (grid, args, kw), (rgrid, rargs, rkw) = gemm.calls[-1], reduce.calls[-1]
    ws = args[2]
    assert grid == (48, 3) and args[-1] == 1536 and kw["PARTIALS"] and kw["BLOCK_M"] == 64
    assert ws.shape == (3, 33, 6144) and ws.dtype == torch.float32
    assert rgrid == (-(-33 * 6144 // sk.REDUCE_BLOCK),) and rkw["SPLIT_K"] == 3
    assert rargs[0] is ws and rargs[1] is y and rargs[2] == 33 * 6144
    with FakeTensorMode():
        y = sk.splitk_gemm(torch.empty(33, 4096, dtype=torch.bfloat16), torch.empty(6144, 4096, dtype=torch.bfloat16),
                           SplitKConfig(128, 256, 3, 8, 4))
    assert gemm.calls[-1][0] == grid and gemm.calls[-1][2] == kw and reduce.calls[-1][0] == rgrid
    assert sk.splitk_gemm(torch.randn(1, 200), torch.randn(72, 200), SplitKConfig(32, 32, 4, 4, 2)).shape == (1, 72)
    assert gemm.calls[-1][2]["BLOCK_M"] == 16 and gemm.calls[-1][2]["EVEN_K"] is False  # dot tiles >= 16 rows
    assert gemm.calls[-1][1][-1] == 64  # cdiv(cdiv(200, 4), 32) * 32


def test_wrapper_refuses_what_the_kernel_does_not_compute():
    from rapid.model.splitk_gemm import splitk_gemm

    cfg = SplitKConfig(32, 32, 2, 4, 2)
    with pytest.raises(ValueError, match="at most 128 rows"):
        splitk_gemm(torch.randn(129, 64), torch.randn(32, 64), cfg)
    with pytest.raises(ValueError, match="same K"):
        splitk_gemm(torch.randn(4, 64), torch.randn(32, 60), cfg)
    with pytest.raises(ValueError, match="rows contiguous"):
        splitk_gemm(torch.randn(4, 64), torch.randn(64, 32).t(), cfg)
    assert splitk_gemm(torch.randn(0, 64), torch.randn(32, 64), cfg).shape == (0, 32)  # nothing launched


LLAMA_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]  # qkv o gate_up down lm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
@pytest.mark.parametrize("split_k", [1, 4])
def test_gpu_splitk_gemm_compiled_and_in_a_cuda_graph(n, k, split_k):
    """On the GPU at batch 64: against torch in bf16, and the same bits run to run, from torch.compile (Dynamo
    traces the Triton launches) and from a CUDA graph replay of the compiled call."""
    from rapid.model.splitk_gemm import splitk_gemm

    torch.manual_seed(0)
    cfg = SplitKConfig(64, 128, split_k, 4, 4)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(64, k, device="cuda", dtype=torch.bfloat16)
    eager = splitk_gemm(x, w, cfg)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert ((eager.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(splitk_gemm(x, w, cfg), eager)
    compiled = torch.compile(lambda a: splitk_gemm(a, w, cfg), fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        static_y = compiled(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    assert torch.equal(static_y, splitk_gemm(x * 2, w, cfg))


def fix_interpreter_bf16_dot() -> None:
    """tests/test_paged_prefill.py's widening of bf16 tl.dot operands to fp32 (exact) in the interpreter; the same
    widening here if that module cannot be imported (it imports rapid.attention)."""
    try:
        from test_paged_prefill import _fix_interpreter_bf16_dot
    except Exception:  # any failure to import it (rapid.attention mid-edit, say): widen here
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        def _fix_interpreter_bf16_dot():
            create_dot = interpreter.InterpreterBuilder.create_dot

            def widen(x):
                if x.dtype != tl.bfloat16:
                    return x
                return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

            interpreter.InterpreterBuilder.create_dot = lambda self, a, b, *rest: create_dot(self, widen(a), widen(b),
                                                                                             *rest)
    _fix_interpreter_bf16_dot()


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.path.insert(0, os.path.dirname(__file__))
    fix_interpreter_bf16_dot()
    for r in run_cases():
        print("RESULT " + json.dumps(r), flush=True)
