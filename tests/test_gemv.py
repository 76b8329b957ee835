"""The one-token Triton GEMV (rapid/model/gemv.py) and the Linear that uses it (rapid/model/linear.py): on the CPU
through Triton's interpreter, in a subprocess (this file run as a script), against torch's products; a tiny
model's prefill-then-decode logits with the GEMV on equal transformers'. What the GEMV is switched on for, and
that it stays off for more than one token, is checked here in process."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from triton_interpreted import interpreted_results

from rapid.model.linear import GemvConfig, Linear, config_for, gemv_applies

# (N, K, config, dtype): rows and columns that divide the blocks; neither divides; one row per program
KERNEL_CASES = [(48, 64, (8, 32, 4, 2), "float32"), (50, 96, (16, 64, 4, 1), "float32"),
                (7, 40, (1, 16, 1, 2), "float32"), (33, 100, (2, 32, 2, 3), "bfloat16")]
NUM_CASES = len(KERNEL_CASES) + 2


def run_cases() -> list[dict]:
    from rapid.model.gemv import gemv  # in the interpreter subprocess only

    out = []
    for i, (N, K, cfg, dtype) in enumerate(KERNEL_CASES):
        g = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        x, w = torch.randn(1, K, generator=g).to(dt), torch.randn(N, K, generator=g).to(dt)
        y = gemv(x, w, GemvConfig(*cfg))
        ref = x.float() @ w.float().T
        out.append({"case": f"kernel {N}x{K} {dtype}", "shape": list(y.shape), "dtype": str(y.dtype),
                    "max_err": float((y.float() - ref).abs().max()), "scale": float(ref.abs().max())})
    # the Linear: one token through the GEMV (with a bias), three tokens through torch
    torch.manual_seed(5)
    lin = Linear(40, 24, bias=True)
    lin.use_gemv(True)
    one, three = torch.randn(1, 40), torch.randn(3, 40)
    out.append({"case": "linear", "one_err": float((lin(one) - torch.nn.functional.linear(one, lin.weight, lin.bias))
                                                   .abs().max()),
                "three_equal": bool(torch.equal(lin(three), torch.nn.functional.linear(three, lin.weight, lin.bias))),
                "one_3d_equal": bool(torch.equal(lin(one[None]), torch.nn.functional.linear(one[None], lin.weight,
                                                                                           lin.bias)))})
    out.append({"case": "model", **model_case()})
    return out


def model_case() -> dict:
    """A tiny Llama's logits, prompt then three single-token steps, with the GEMV on, against transformers."""
    import tempfile

    from test_model import load, run_chunks
    from tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(tmp, "qwen2", with_tokenizer=False, tie=True)  # qkv bias, tied LM head
        ours = load(folder).use_gemv(True)
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
        want = ref(ids[None]).logits[0]
    got = run_chunks(ours, ids, [(0, 9), (9, 10), (10, 11), (11, 12)])
    return {"max_err": float((got - want).abs().max()), "argmax_equal": bool(torch.equal(got.argmax(-1),
                                                                                         want.argmax(-1)))}


def test_gemv_equals_torch_under_the_interpreter():
    results = {r["case"]: r for r in interpreted_results(__file__, NUM_CASES)}
    for N, K, _, dtype in KERNEL_CASES:
        r = results[f"kernel {N}x{K} {dtype}"]
        assert r["shape"] == [1, N] and r["dtype"] == f"torch.{dtype}"
        # float32: summation order only; bfloat16: the output's rounding (8 bits of mantissa)
        assert r["max_err"] <= (1e-5 if dtype == "float32" else 2**-7) * r["scale"], r
    lin = results["linear"]  # one row: the GEMV; three rows, or one row in 3-D: torch's product, bit for bit
    assert lin["one_err"] < 1e-5 and lin["three_equal"] and lin["one_3d_equal"], lin
    model = results["model"]
    assert model["max_err"] < 2e-4 and model["argmax_equal"], model


def test_use_gemv_configures_every_projection_and_the_lm_head(tmp_path, monkeypatch):
    import rapid.model.gemv
    from test_model import load
    from tiny import make_tiny_model

    model = load(make_tiny_model(tmp_path, "llama", with_tokenizer=False))  # untied: an lm_head Linear
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.num_layers + 1 and all(m.gemv_config is None for m in linears)
    model.use_gemv(True)
    assert all(m.gemv_config == config_for(m.in_features) for m in linears)
    assert model.logits_gemv == config_for(model.config.hidden_size)
    # one row's logits go through the kernel (a stub here), two rows' through torch
    monkeypatch.setattr(rapid.model.gemv, "gemv", lambda x, w, cfg: torch.full((1, w.shape[0]), 7.0))
    hidden = torch.randn(2, model.config.hidden_size)
    assert bool((model.compute_logits(hidden[:1]) == 7).all())
    assert torch.equal(model.compute_logits(hidden), hidden @ model.lm_head.weight.t())
    model.use_gemv(False)
    assert all(m.gemv_config is None for m in linears) and model.logits_gemv is None


def test_only_one_row_of_the_weights_width_dtype_and_layout_reaches_the_kernel(monkeypatch):
    """Everything else goes to torch: a wrong width or dtype gets torch's own error, and a weight whose rows are not
    contiguous (the kernel reads rows by one stride) gets torch's product. The kernel is a stub that must not run."""
    import rapid.model.gemv

    def launched(*args):
        raise AssertionError("the GEMV kernel was launched")

    monkeypatch.setattr(rapid.model.gemv, "gemv", launched)
    lin = Linear(8, 4, bias=False)
    lin.use_gemv(True)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        lin(torch.randn(1, 6))
    with pytest.raises(RuntimeError, match="dtype"):
        lin(torch.randn(1, 8, dtype=torch.float64))
    x = torch.randn(1, 8)
    lin.weight = torch.nn.Parameter(torch.randn(8, 4).t(), requires_grad=False)  # [4, 8], column stride 4
    assert not gemv_applies(x, lin.weight) and torch.equal(lin(x), x @ lin.weight.t())
    assert gemv_applies(x, lin.weight.contiguous())
    lin.weight = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
    with pytest.raises(AssertionError, match="launched"):  # and a product the GEMV computes does reach it
        lin(x)


def test_config_for_follows_the_sweep():
    # bench/results/session30/call2: 2 rows and 2048 columns a step, 2 warps, for both 4096 and 14336 columns
    assert config_for(4096) == config_for(14336) == GemvConfig(2, 2048, 2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 300)])
def test_gpu_gemv_compiled_and_in_a_cuda_graph(n, k):
    """On the GPU: against cuBLAS in bf16, and the same bits from eager, torch.compile (Dynamo traces the Triton
    launch) and a CUDA graph replay of the compiled Linear, as the decode graphs run it."""
    torch.manual_seed(0)
    lin = Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.use_gemv(True)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    eager = lin(x)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float())
    assert ((eager.float() - ref).norm() / ref.norm()).item() < 1e-2
    compiled = torch.compile(lin.forward, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    with torch.cuda.graph(graph):
        static_y = compiled(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    assert torch.equal(static_y, lin(x * 2))


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.path.insert(0, os.path.dirname(__file__))
    for r in run_cases():
        print("RESULT " + json.dumps(r), flush=True)
