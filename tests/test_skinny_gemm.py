"""The model's linear layer (rapid.model.skinny_gemm): the Triton kernel for a few rows against a float64 matmul on
the CPU through Triton's interpreter (in a subprocess: TRITON_INTERPRET=1 is read when a kernel module is imported),
the custom op's CPU path and its place in torch.compile, and (marked gpu) the kernel at Llama-3.1-8B shapes against
cuBLAS, the autotuner included."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from triton_interpreted import interpreted_results

from rapid.model.skinny_gemm import SKINNY_MAX_ROWS, Linear, rapid_linear

# (M, N, K, bias, BLOCK_N, BLOCK_K): one row; rows and columns that do not fill a block; K not a multiple of BLOCK_K;
# the most rows; a bias
KERNEL_CASES = [(1, 64, 128, False, 16, 64), (3, 50, 96, False, 32, 64), (16, 40, 200, True, 16, 128),
                (7, 33, 33, True, 16, 16), (2, 128, 256, False, 64, 256)]


def run_kernel_cases() -> list[dict]:
    from rapid.model.skinny_gemm_kernel import skinny_matmul

    out = []
    for i, (M, N, K, bias, block_n, block_k) in enumerate(KERNEL_CASES):
        g = torch.Generator().manual_seed(i)
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g) if bias else None
        got = skinny_matmul(x, w, b, config={"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4,
                                             "num_stages": 1})
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
        out.append({"case": i, "shape": list(got.shape), "max_err": float((got.double() - want).abs().max()),
                    "scale": float(want.abs().max())})
    return out


def test_triton_kernel_equals_a_matmul_under_the_interpreter():
    lines = interpreted_results(__file__, len(KERNEL_CASES))
    for r, (M, N, *_rest) in zip(lines, KERNEL_CASES):
        assert r["shape"] == [M, N], r
        assert r["max_err"] <= 1e-4 * max(r["scale"], 1.0), r  # float32 accumulation of float32 inputs


def test_the_kernel_refuses_more_rows_than_it_pads_to():
    pytest.importorskip("triton")
    from rapid.model.skinny_gemm_kernel import skinny_matmul

    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_matmul(torch.zeros(SKINNY_MAX_ROWS + 1, 8), torch.zeros(4, 8))


def test_on_the_cpu_the_layer_and_the_op_are_f_linear_eager_and_compiled():
    layer = Linear(24, 40, bias=True).requires_grad_(False)
    plain = torch.nn.Linear(24, 40)
    plain.load_state_dict(layer.state_dict())  # the same parameters and names as nn.Linear
    x = torch.randn(5, 24)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert torch.equal(rapid_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    with torch.inference_mode():  # the op inside a compiled function (on CUDA the decode graphs hold it so)
        compiled = torch.compile(lambda t: rapid_linear(t, layer.weight, layer.bias).relu(), dynamic=True,
                                 fullgraph=True)
        for rows in (1, 5, 40):  # both sides of SKINNY_MAX_ROWS
            t = torch.randn(rows, 24)
            assert torch.allclose(compiled(t), plain(t).relu(), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_kernel_matches_cublas_at_llama_shapes():
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:  # qkv, o, gate/up, down
        for rows in (1, 2, 5, 8, 16):
            g = torch.Generator(device="cuda").manual_seed(rows)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5
            want = F.linear(x.double(), w.double())
            got = rapid_linear(x, w, None)  # the custom op: Triton for these rows (the autotuner runs first)
            assert got.shape == (rows, n) and got.dtype == torch.bfloat16
            ref = F.linear(x, w)  # cuBLAS, bf16 out: the kernel must be as close to float64 as cuBLAS is
            err, ref_err = (got.double() - want).abs().max(), (ref.double() - want).abs().max()
            assert err <= 2 * ref_err + 1e-3, (n, k, rows, float(err), float(ref_err))


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for r in run_kernel_cases():
        print("RESULT " + json.dumps(r), flush=True)
