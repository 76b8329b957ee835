"""The Triton paged prefill kernel (rapid/attention/paged_prefill.py) on the CPU, through Triton's interpreter.

TRITON_INTERPRET=1 only takes effect if set before the kernel module is imported (it is read when
@triton.jit decorates), and other test modules may already have imported triton and rapid.attention
in this process. So the kernel runs in one subprocess (this file run as a script, with TRITON_INTERPRET=1)
that checks every case of CASES against ReferenceAttention._prefill and prints one RESULT line per case;
the parametrized tests read those lines. The graph-safety test runs here, with the launch stubbed out.

Triton 3.9's interpreter multiplies bfloat16 tl.dot operands as their raw uint16 bits (its create_dot only
widens 8-bit floats); the subprocess widens them to fp32 first (_fix_interpreter_bf16_dot) so the bf16
case checks the kernel, not that bug.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rapid.attention.reference import ReferenceAttention

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |out - ref|, ref in fp32

# name -> case. seqs: [(context length after the chunk, chunk length)]; chunk length 0 = padding row.
CASES = {
    # GQA 4/2: a fresh prompt, a later chunk starting mid-block (earlier tokens in the pool), a prompt
    # whose first 4 blocks are a cached prefix, a padding row, a decode-like row; small tiles so
    # queries span 2 tiles and keys several tiles (8 tokens x 2 heads per 16-row tile).
    "gqa4/2-d16-bs4-f32": dict(seqs=[(11, 11), (30, 7), (24, 8), (0, 0), (9, 1)], heads=4, kv_heads=2, head_dim=16,
                               block_size=4, dtype=torch.float32, block_m=16, block_n=16, max_query_len=11),
    # MHA, default tiles, no max_query_len (T is the bound), a padding row with a context but no chunk.
    "mha2-d32-bs16-f32": dict(seqs=[(40, 40), (50, 17), (5, 0), (3, 3)], heads=2, kv_heads=2, head_dim=32,
                              block_size=16, dtype=torch.float32),
    # one kv head for 4 query heads, fp16, a loose bound (64 > 37), trailing padding.
    "gqa4/1-d32-bs16-f16": dict(seqs=[(37, 37), (45, 13), (0, 0)], heads=4, kv_heads=1, head_dim=32,
                                block_size=16, dtype=torch.float16, block_m=16, block_n=32, max_query_len=64),
    # group of 3 (5 tokens x 3 heads in a 16-row tile, one row unused), bf16, a non-power-of-2 head_dim.
    "gqa6/2-d24-bs4-bf16": dict(seqs=[(20, 20), (0, 0), (26, 9)], heads=6, kv_heads=2, head_dim=24,
                                block_size=4, dtype=torch.bfloat16, block_m=16, block_n=16, max_query_len=20),
}


def make_batch(seqs, heads, kv_heads, head_dim, block_size, dtype, seed=0, extra_rows=3):
    """Random q [T, H, D] and pool [2, NB, BS, KVH, D]; shuffled, zero-padded block tables; `extra_rows`
    trailing q rows that belong to no sequence."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-ctx // block_size) for ctx, _ in seqs) + 5
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-ctx // block_size) for ctx, _ in seqs) + 2
    tables, starts = [], [0]
    for ctx, ql in seqs:
        nb = -(-ctx // block_size)
        blocks, perm = perm[:nb], perm[nb:]
        tables.append(blocks + [0] * (width - nb))
        starts.append(starts[-1] + ql)
    T = starts[-1] + extra_rows
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype)
    pool = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return (q, pool, torch.tensor(tables, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32),
            torch.tensor([ctx for ctx, _ in seqs], dtype=torch.int32))


def reference(q, pool, tables, starts, lens, heads, kv_heads, head_dim):
    """Per sequence ReferenceAttention._prefill, in fp32 from the (upcast) same inputs; NaN where uncovered."""
    ref = ReferenceAttention(heads, kv_heads, head_dim, head_dim**-0.5)
    out = torch.full(q.shape, float("nan"))
    for i in range(len(lens)):
        s, e = int(starts[i]), int(starts[i + 1])
        if e > s:
            out[s:e] = ref._prefill(q[s:e].float(), pool.float(), tables[i], int(lens[i]))
    return out


def run_case(name: str) -> dict:
    """Run one case through the kernel (the caller set TRITON_INTERPRET=1 before any import of it)."""
    from rapid.attention.paged_prefill import paged_prefill_attention

    c = dict(CASES[name])
    seqs, dtype = c.pop("seqs"), c.pop("dtype")
    H, KVH, D, BS = c.pop("heads"), c.pop("kv_heads"), c.pop("head_dim"), c.pop("block_size")
    q, pool, tables, starts, lens = make_batch(seqs, H, KVH, D, BS, dtype)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(q, pool, tables, starts, lens, D**-0.5, out=out, **c)
    ref = reference(q, pool, tables, starts, lens, H, KVH, D)
    covered = ~ref.isnan()
    problems = []
    if got is not out:
        problems.append("did not return the given out")
    if not bool(out[~covered].isnan().all()):
        problems.append("wrote rows that belong to no sequence")
    if not bool(out[covered].isfinite().all()):
        problems.append("non-finite (or unwritten) values in covered rows")
    err = (out.float()[covered] - ref[covered]).abs().max().item()
    if not err <= TOL[dtype]:
        problems.append(f"max |out - ref| = {err:.3g} > {TOL[dtype]:g}")
    return dict(name=name, err=err, problems=problems)


@pytest.fixture(scope="module")
def interpreted():
    """name -> result dict, from one interpreter subprocess running every case."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["name"]] = r
    if set(results) != set(CASES):
        pytest.fail(f"interpreter subprocess (rc {proc.returncode}) reported {sorted(results)}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_under_the_interpreter(interpreted, name):
    r = interpreted[name]
    assert not r["problems"], f"{name}: " + "; ".join(r["problems"])


class _Launch:
    """Stands in for the jitted kernel: records kernel[grid](*args, **kwargs) instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _no_host_reads(*_a, **_k):
    raise AssertionError("host read of device data in the wrapper (a sync; breaks CUDA-graph capture)")


def test_wrapper_is_graph_safe(monkeypatch):
    """No host read of tensor data, and a launch (grid, constants) that depends on host bounds only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rapid.attention import paged_prefill as pp

    # Two batches of the same shapes and bounds but different lengths and tables: the same launch.
    batches = [make_batch([(11, 11), (30, 7), (0, 0), (9, 1)], 4, 2, 16, 4, torch.float32, extra_rows=1),
               make_batch([(29, 1), (8, 2), (16, 16), (5, 0)], 4, 2, 16, 4, torch.float32, extra_rows=1)]
    assert batches[0][0].shape == batches[1][0].shape and batches[0][2].shape == batches[1][2].shape
    launch = _Launch()
    monkeypatch.setattr(pp, "_paged_prefill_kernel", launch)
    for attr in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, _no_host_reads)
    for q, pool, tables, starts, lens in batches:
        out = pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16)
        assert out.shape == q.shape
        grid, args, _ = launch.calls[-1]
        # the metadata goes to the kernel as the very tensors given: it is read on the device only
        assert args[3] is tables and args[4] is starts and args[5] is lens
    (grid0, args0, kw0), (grid1, args1, kw1) = launch.calls
    assert grid0 == grid1 == (4, 2, 2)  # (sequence rows, cdiv(16, 16 rows // group 2), kv heads)
    assert kw0 == kw1 and args0[7:] == args1[7:]  # same constants, scale and strides
    # Tensors without data at all (FakeTensorMode raises on any data-dependent op) launch just the same.
    with FakeTensorMode():
        q, pool = torch.empty(17, 4, 16), torch.empty(2, 32, 4, 2, 16)
        tables, starts, lens = (torch.empty(4, 8, dtype=torch.int32), torch.empty(5, dtype=torch.int32),
                                torch.empty(4, dtype=torch.int32))
        pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16)
    assert launch.calls[-1][0] == grid0 and launch.calls[-1][2] == kw0


def test_launch_config_from_bounds():
    from rapid.attention.paged_prefill import prefill_launch_config

    assert prefill_launch_config(3, 100, 32, 8, block_m=64) == ((3, 7, 8), 64)  # 16 tokens x 4 heads per tile
    assert prefill_launch_config(3, 100, 6, 2, block_m=16) == ((3, 20, 2), 16)  # group 3: 5 tokens per tile
    assert prefill_launch_config(2, 5, 64, 1, block_m=16) == ((2, 5, 1), 64)  # raised to the group
    assert prefill_launch_config(2, 0, 8, 8) == ((2, 1, 8), 64)  # an all-padding batch still launches
    with pytest.raises(ValueError):
        prefill_launch_config(1, 8, 6, 4)


def _fix_interpreter_bf16_dot():
    """Widen bf16 dot operands to fp32 in the interpreter (exact; a GPU's bf16 MMA accumulates in fp32)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, create_dot = interpreter.InterpreterBuilder, interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    builder.create_dot = lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest)


if __name__ == "__main__":  # the interpreter subprocess of `interpreted`
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _fix_interpreter_bf16_dot()
    failed = False
    for case in CASES:
        try:
            res = run_case(case)
        except Exception as e:  # report it as this case's problem; the other cases still run
            res = dict(name=case, err=None, problems=[f"{type(e).__name__}: {e}"])
        failed |= bool(res["problems"])
        print("RESULT " + json.dumps(res), flush=True)
        if res["problems"]:
            print(f"MISMATCH {case}: " + "; ".join(res["problems"]), file=sys.stderr)
    sys.exit(1 if failed else 0)
