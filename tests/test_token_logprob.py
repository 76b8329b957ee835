"""The sampled token's logprob (rapid.worker.sampler_ops.token_logprob): the tensor code against log_softmax, and the
one-pass Triton kernel (rapid.worker.token_logprob_kernel) against it on the CPU through Triton's interpreter (in a
subprocess: TRITON_INTERPRET=1 is read when a kernel module is imported, which other tests may have done)."""

from __future__ import annotations

import json
import math
import os

import torch
from triton_interpreted import interpreted_results

from rapid.worker.sampler_ops import token_logprob

# (rows, vocab, parts, block, share of -inf logits): one part; parts that do not divide the vocabulary; small blocks;
# a row's whole part masked (its max stays -inf and must add nothing)
KERNEL_CASES = [(3, 500, 1, 128, 0.0), (4, 1000, 3, 64, 0.3), (2, 4099, 5, 256, 0.9), (6, 77, 4, 16, 0.0),
                (2, 300, 3, 64, -1.0)]


def make_case(i: int, B: int, V: int, masked: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(B, V, generator=g) * 5 + 40  # far from 0: a kernel that forgot the max would overflow exp
    if masked < 0:
        x[:, : V // 2] = float("-inf")  # the first part of every row: nothing but -inf
    else:
        x[torch.rand(B, V, generator=g) < masked] = float("-inf")
    finite = torch.isfinite(x)
    tokens = torch.tensor([int(torch.nonzero(finite[r])[torch.randint(0, int(finite[r].sum()), (1,), generator=g)])
                           for r in range(B)])
    return x, tokens


def test_tensor_code_equals_log_softmax():
    x, tokens = make_case(0, 5, 1000, 0.5)
    want = torch.log_softmax(x.double(), dim=-1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(token_logprob(x, tokens).double(), want, atol=1e-4)


def special_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits the sampler can meet or a caller could pass: +inf, NaN, a row of nothing but -inf, bf16, a column
    slice (row stride != V) and a transposed view (column stride != 1)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 300, generator=g) * 4
    posinf, nan, masked = x.clone(), x.clone(), x.clone()
    posinf[0, 10] = float("inf")  # that token's logprob is NaN, every other token's -inf (torch.logsumexp's answers)
    nan[1, 250] = float("nan")
    masked[2] = float("-inf")
    wide = torch.randn(3, 700, generator=g) * 4
    tall = torch.randn(300, 3, generator=g) * 4
    tokens = torch.tensor([3, 200, 299])
    return {"posinf": (posinf, tokens), "posinf-token": (posinf, torch.tensor([10, 0, 0])), "nan": (nan, tokens),
            "all -inf": (masked, tokens), "bf16": (x.to(torch.bfloat16), tokens),
            "column slice": (wide[:, 100:400], tokens), "transposed": (tall.t(), tokens)}


def run_kernel_cases() -> list[dict]:
    from rapid.worker.token_logprob_kernel import launch_token_logprob  # in the interpreter subprocess only

    cases = [(f"random {i}", *make_case(i, B, V, masked), parts, block)
             for i, (B, V, parts, block, masked) in enumerate(KERNEL_CASES)]
    cases += [(name, x, tokens, 3, 64) for name, (x, tokens) in special_cases().items()]
    out = []
    for name, x, tokens, parts, block in cases:
        xd = x.double()  # the tensor code's formula (what the CPU runs), in float64: logsumexp takes +inf as the max
        want = (xd.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(xd, dim=-1)).tolist()
        got = launch_token_logprob(x, tokens, parts=parts, block=block).tolist()
        out.append({"case": name, "want": want, "got": got})
    return out


def same(got: float, want: float) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == want or abs(got - want) < 1e-4


def test_triton_kernel_equals_log_softmax_under_the_interpreter():
    lines = interpreted_results(__file__, len(KERNEL_CASES) + len(special_cases()))
    for r in lines:
        assert len(r["got"]) == len(r["want"]) > 0 and all(same(g, w) for g, w in zip(r["got"], r["want"])), r


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for r in run_kernel_cases():
        print("RESULT " + json.dumps(r), flush=True)
