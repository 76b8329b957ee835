"""The Triton paged prefill kernel (rapid/attention/paged_prefill.py) on the CPU, through Triton's interpreter.

TRITON_INTERPRET=1 only takes effect if set before the kernel module is imported (it is read when
@triton.jit decorates), and other test modules may already have imported triton and rapid.attention
in this process. So the kernel runs in one subprocess (this file run as a script, with TRITON_INTERPRET=1)
that checks every case of CASES against ReferenceAttention._prefill and prints one RESULT line per case;
the parametrized tests read those lines. The graph-safety, grid-size and tile-map tests run here, with the
launch stubbed out (host arithmetic and torch ops on the CPU only).

Every case runs the default flat tile grid ((num_tiles, KVH), tile -> (sequence, first token) from a device
tile map) except one that keeps the older per-sequence grid (flat_grid=False).

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

# A mixed batch as a whole-batch graph would see it: 40 decode rows (q_len 1) with padding rows (q_len 0,
# with and without a context) among them, then one long chunk whose earlier 30 tokens are in the pool.
MIXED = [(1 + (7 * i) % 37, 1) for i in range(40)]
MIXED[5:5] = [(0, 0)]
MIXED[20:20] = [(12, 0)]
MIXED += [(100, 70), (0, 0)]

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
    # the first case again on the older per-sequence grid (S, cdiv(max_query_len, TOKENS), KVH)
    "gqa4/2-d16-bs4-f32-seqgrid": dict(seqs=[(11, 11), (30, 7), (24, 8), (0, 0), (9, 1)], heads=4, kv_heads=2,
                                       head_dim=16, block_size=4, dtype=torch.float32, block_m=16, block_n=16,
                                       max_query_len=11, flat_grid=False),
    # MIXED, 8 tokens x 2 heads per tile, with the exact token count as the bound: cdiv(110, 8) + 44 = 58
    # tiles per kv head for 40 + 9 useful ones (the per-sequence grid would launch 44 x 9).
    "mixed-decodes-chunk-gqa4/2-f32": dict(seqs=MIXED, heads=4, kv_heads=2, head_dim=16, block_size=4,
                                           dtype=torch.float32, block_m=16, block_n=16, max_query_len=70,
                                           max_num_tokens=sum(ql for _, ql in MIXED)),
    # MIXED, fp16, default tiles (16 tokens x 4 heads), no bounds given (T = 113 rows bounds both)
    "mixed-decodes-chunk-gqa8/2-f16": dict(seqs=MIXED, heads=8, kv_heads=2, head_dim=32, block_size=16,
                                           dtype=torch.float16),
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


def run_case(name: str, device: str = "cpu") -> dict:
    """Run one case through the kernel: on the CPU under the interpreter (the caller set TRITON_INTERPRET=1
    before any import of it), or compiled on a GPU (device="cuda"; tests/test_gpu_attention.py)."""
    from rapid.attention.paged_prefill import paged_prefill_attention

    c = dict(CASES[name])
    seqs, dtype = c.pop("seqs"), c.pop("dtype")
    H, KVH, D, BS = c.pop("heads"), c.pop("kv_heads"), c.pop("head_dim"), c.pop("block_size")
    q, pool, tables, starts, lens = make_batch(seqs, H, KVH, D, BS, dtype)
    ref = reference(q, pool, tables, starts, lens, H, KVH, D)
    q, pool, tables, starts, lens = (t.to(device) for t in (q, pool, tables, starts, lens))
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(q, pool, tables, starts, lens, D**-0.5, out=out, **c)
    returned_out, out = got is out, out.cpu()
    covered = ~ref.isnan()
    problems = []
    if not returned_out:
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


def expected_tile_map(starts, tokens: int, num_tiles: int) -> list[tuple[int, int]]:
    """The tile map by plain enumeration: each sequence's tiles in order, then (-1, _) up to num_tiles."""
    tiles = [(s, f) for s in range(len(starts) - 1) for f in range(0, starts[s + 1] - starts[s], tokens)]
    assert len(tiles) <= num_tiles, "the tile bound does not hold"
    return tiles + [(-1, None)] * (num_tiles - len(tiles))


def _same_map(got: torch.Tensor, want) -> bool:
    return len(got) == len(want) and all(int(g[0]) == s and (s < 0 or int(g[1]) == f) for g, (s, f) in zip(got, want))


def test_tile_map():
    """prefill_tile_map (torch ops, CPU here) against enumeration: padding rows own no tiles, the rest run on."""
    from rapid.attention.paged_prefill import prefill_tile_map

    g = torch.Generator().manual_seed(1)
    for tokens in (1, 5, 8, 16):
        for _ in range(10):
            qlens = torch.randint(0, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
            qlens[torch.rand(len(qlens), generator=g) < 0.3] = 0  # padding rows
            offset = int(torch.randint(0, 9, (1,), generator=g))  # query_start_loc sliced from num_decodes on
            starts = [offset] + (offset + qlens.cumsum(0)).tolist()
            n = -(-int(qlens.sum()) // tokens) + len(qlens)  # the flat grid's bound
            for qsl in (torch.tensor(starts, dtype=torch.int32), torch.tensor(starts)):  # int32 or int64
                m = prefill_tile_map(qsl, tokens, n)
                assert m.shape == (n, 2) and m.dtype == torch.int32
                assert _same_map(m, expected_tile_map(starts, tokens, n)), (starts, tokens, m.tolist())
    m = prefill_tile_map(torch.zeros(4, dtype=torch.int32), 8, 3)  # an all-padding batch: every tile exits
    assert m[:, 0].tolist() == [-1, -1, -1]


def test_wrapper_is_graph_safe(monkeypatch):
    """No host read of tensor data (the device tile map included), and a launch (grid, constants) that depends
    on host bounds only."""
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
        for flat in (True, False):
            out = pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16,
                                             flat_grid=flat)
            assert out.shape == q.shape
            _, args, kw = launch.calls[-1]
            # the metadata goes to the kernel as the very tensors given: it is read on the device only
            assert args[3] is tables and args[4] is starts and args[5] is lens and kw["FLAT"] is flat
    (grid0, args0, kw0), (old0, _, _), (grid1, args1, kw1), (old1, _, _) = launch.calls
    # 20 rows, 4 sequence rows, 8 tokens (16 rows // group 2) per tile: min(cdiv(20, 8) + 4, 4 * cdiv(16, 8))
    assert grid0 == grid1 == (7, 2) and old0 == old1 == (4, 2, 2)
    assert kw0 == kw1 and args0[8:] == args1[8:]  # same constants, scale and strides
    maps = [args0[6], args1[6]]  # the tile maps: same shape, built from each batch's query_start_loc
    # Tensors without data at all (FakeTensorMode raises on any data-dependent op) launch just the same: the
    # tile map's cumsum / searchsorted / gather have shapes from S and the bound only.
    with FakeTensorMode():
        q, pool = torch.empty(17, 4, 16), torch.empty(2, 32, 4, 2, 16)
        tables, starts, lens = (torch.empty(4, 8, dtype=torch.int32), torch.empty(5, dtype=torch.int32),
                                torch.empty(4, dtype=torch.int32))
        pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16)
    assert launch.calls[-1][0] == grid0 and launch.calls[-1][2] == kw0
    assert launch.calls[-1][1][6].shape == (7, 2)
    monkeypatch.undo()  # host reads allowed again: check the maps' contents
    for m, (_, _, _, starts, _) in zip(maps, batches):
        assert m.shape == (7, 2) and _same_map(m, expected_tile_map(starts.tolist(), 8, 7)), m.tolist()


def test_step_tile_map_is_the_map_each_call_would_build(monkeypatch):
    """Built once per step (TritonAttention.plan), the map is the one the call builds for itself, goes to the
    kernel as given, and a map built for another batch shape is refused."""
    from rapid.attention import paged_prefill as pp

    q, pool, tables, starts, lens = make_batch([(11, 11), (30, 7), (0, 0), (9, 1)], 4, 2, 16, 4, torch.float32,
                                               extra_rows=1)
    launch = _Launch()
    monkeypatch.setattr(pp, "_paged_prefill_kernel", launch)
    pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16)
    own = launch.calls[-1][1][6]
    shared = pp.step_tile_map(q.shape[0], 16, 4, 2, starts, block_m=16)
    assert torch.equal(shared, own)
    pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16, tile_map=shared)
    assert launch.calls[-1][1][6] is shared and launch.calls[-1][0] == launch.calls[-2][0]
    other_batch = pp.step_tile_map(q.shape[0] + 40, 16, 4, 2, starts, block_m=16)  # planned for 40 more rows
    with pytest.raises(ValueError, match=f"tile_map has {other_batch.shape[0]} tiles, this launch needs 7"):
        pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=16, block_m=16,
                                   tile_map=other_batch)


def test_flat_grid_is_proportional_to_the_work(monkeypatch):
    """255 decode rows + one 2048-token chunk + a padding row (S = 257): the flat grid launches
    cdiv(T, TOKENS) + S programs per kv head, not S x cdiv(max_query_len, TOKENS) (host arithmetic; the
    wrapper runs with the launch stubbed out and builds the tile map on the CPU)."""
    from rapid.attention import paged_prefill as pp

    S, T, KVH, H, tokens = 257, 255 + 2048, 8, 32, 16  # block_m 64 = 16 tokens x group 4
    flat, bm = pp.prefill_launch_config(S, 2048, H, KVH, 64, max_num_tokens=T)
    old, _ = pp.prefill_launch_config(S, 2048, H, KVH, 64, flat_grid=False)
    assert bm == 64 and flat == (-(-T // tokens) + S, KVH) == (401, 8) and old == (S, 128, KVH)
    assert flat[0] * flat[1] * 50 < old[0] * old[1] * old[2]  # 3208 vs 263168 programs
    useful = 255 + 2048 // tokens  # one tile per decode row, 128 for the chunk
    assert useful <= flat[0] < useful + S // 2

    launch = _Launch()
    monkeypatch.setattr(pp, "_paged_prefill_kernel", launch)
    starts = torch.tensor(list(range(256)) + [T, T], dtype=torch.int32)
    q, pool = torch.empty(T, H, 16), torch.empty(2, 4, 16, KVH, 16)
    tables, lens = torch.zeros(S, 2, dtype=torch.int32), torch.cat([torch.ones(255), torch.tensor([2048, 0])]).int()
    pp.paged_prefill_attention(q, pool, tables, starts, lens, 0.25, max_query_len=2048)
    grid, args, _ = launch.calls[-1]
    assert grid == flat and args[6].shape == (flat[0], 2)
    assert _same_map(args[6], expected_tile_map(starts.tolist(), tokens, flat[0]))
    assert int((args[6][:, 0] >= 0).sum()) == useful


def test_launch_config_from_bounds():
    from rapid.attention.paged_prefill import prefill_launch_config

    # per-sequence grid: (S, cdiv(max_query_len, TOKENS), KVH)
    assert prefill_launch_config(3, 100, 32, 8, block_m=64, flat_grid=False) == ((3, 7, 8), 64)  # 16 tok x 4 h
    assert prefill_launch_config(3, 100, 6, 2, block_m=16, flat_grid=False) == ((3, 20, 2), 16)  # group 3: 5 tok
    assert prefill_launch_config(2, 5, 64, 1, block_m=16, flat_grid=False) == ((2, 5, 1), 64)  # raised to group
    assert prefill_launch_config(2, 0, 8, 8, flat_grid=False) == ((2, 1, 8), 64)  # all padding still launches
    # flat grid: (min(cdiv(max_num_tokens, TOKENS) + S, S * cdiv(max_query_len, TOKENS)), KVH)
    assert prefill_launch_config(3, 100, 32, 8, block_m=64, max_num_tokens=120) == ((11, 8), 64)  # 8 + 3
    assert prefill_launch_config(3, 100, 32, 8, block_m=64) == ((21, 8), 64)  # no token bound: 3 x 7
    assert prefill_launch_config(3, None, 32, 8, max_num_tokens=120) == ((11, 8), 64)
    assert prefill_launch_config(64, 1, 32, 8, max_num_tokens=64) == ((64, 8), 64)  # decodes: one tile each
    assert prefill_launch_config(1, 100, 6, 2, block_m=16, max_num_tokens=100) == ((20, 2), 16)  # one seq
    assert prefill_launch_config(2, 0, 8, 8, max_num_tokens=0) == ((1, 8), 64)
    with pytest.raises(ValueError):
        prefill_launch_config(1, 8, 6, 4)
    with pytest.raises(ValueError):
        prefill_launch_config(1, None, 8, 4)


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
