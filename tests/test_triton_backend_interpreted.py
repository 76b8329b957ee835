"""The whole Triton attention backend (KV store, split-KV decode, prefill by SDPA or by the paged kernel) on the
CPU through Triton's interpreter, against the reference backend: mixed batches of decodes and prefill chunks.

TRITON_INTERPRET=1 must be set before the kernels are decorated, so the checks run in one subprocess (this file
run as a script); each case prints a RESULT line that the tests read."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# (name, seqs [(context after this step, query tokens)], H, KVH, D, block size, dtype, prefill attention)
CASES = [
    ("mixed-paged-f32", [(9, 1), (17, 1), (5, 5), (21, 6), (12, 12)], 4, 2, 16, 4, "float32", "paged"),
    ("mixed-sdpa-f32", [(9, 1), (17, 1), (5, 5), (21, 6), (12, 12)], 4, 2, 16, 4, "float32", "auto"),
    ("prefill-only-paged-f16", [(30, 30), (40, 8)], 4, 4, 32, 16, "float16", "paged"),
    ("decode-only-f32", [(33, 1), (3, 1), (48, 1)], 8, 2, 16, 16, "float32", "paged"),  # whole tiles unmasked
    ("decode-one-f32", [(37, 1)], 8, 2, 16, 16, "float32", "paged"),  # batch 1: the default, one masked loop
]
# Cases whose context is cut into splits (min_split_tokens 16), merged by the reduce kernel.
SPLIT_CASES = [
    ("decode-splits-f32", [(70, 1), (3, 1), (130, 1), (1, 1)], 8, 2, 16, 4, "float32", "paged"),
    ("mixed-splits-f16", [(90, 1), (17, 1), (21, 6)], 4, 2, 32, 16, "float16", "paged"),
]
# Cases with rope: both backends rotate q and k in place (the Triton one inside its KV store kernel).
ROPE_CASES = [
    ("rope-mixed-paged-f32", [(9, 1), (17, 1), (21, 6), (12, 12)], 4, 2, 16, 4, "float32", "paged"),
    ("rope-mixed-sdpa-f16", [(9, 1), (30, 30)], 8, 2, 32, 16, "float16", "auto"),
    ("rope-decode-f16", [(33, 1), (3, 1)], 8, 8, 128, 16, "float16", "paged"),  # bf16: the interpreter truncates
]
# Cases over a float8 pool (kv_cache_dtype fp8 / fp8_e5m2): the store saturates as the reference does, and every
# reader converts the pool's values to q's dtype. The keys and values are float8 values already (and a few past the
# format's range): the interpreter's own rounding to float8 differs from the GPU's (ties away from even, and 127.5
# to 64), so rounding itself is checked on the GPU (tests/test_gpu_attention.py).
FLOAT8_CASES = [
    ("fp8-mixed-paged-f32", [(9, 1), (17, 1), (21, 6), (12, 12)], 4, 2, 16, 4, "float32", "paged"),
    ("fp8-mixed-sdpa-f32", [(9, 1), (21, 6), (12, 12)], 4, 2, 16, 4, "float32", "auto"),
    ("fp8e5m2-decode-splits-f32", [(70, 1), (3, 1), (130, 1)], 8, 2, 16, 4, "float32", "paged"),
    ("fp8-mixed-paged-f16", [(9, 1), (21, 6)], 4, 2, 16, 4, "float16", "paged"),  # 16-bit rows: clamped as such
    ("fp8-mixed-paged-bf16", [(9, 1), (17, 1), (21, 6)], 4, 2, 16, 4, "bfloat16", "paged"),  # float16 dots
]
ALL_CASES = CASES + SPLIT_CASES + ROPE_CASES + FLOAT8_CASES
TOLERANCE = {"float32": 1e-4, "float16": 5e-3}
FLOAT8_TOLERANCE = {"float32": 2e-3, "float16": 0.5, "bfloat16": 0.25}


def run_case(name, seqs, H, KVH, D, block_size, dtype, prefill_attention) -> dict:
    import torch

    from attention_cases import make_case
    from rapid.attention.kv_dtype import as_bytes, is_float8, to_kv
    from rapid.attention.reference import ReferenceAttention
    from rapid.attention.rope import Rope, apply_rope_
    from rapid.attention.triton_backend import TritonAttention

    q, k, v, pool, meta = make_case(seqs, H, KVH, D, block_size, getattr(torch, dtype))
    if name.startswith("fp8"):  # float8 values, and every 7th past the format's range, to be saturated
        kv_dtype = torch.float8_e5m2 if name.startswith("fp8e5m2") else torch.float8_e4m3fn
        far = 2 * torch.finfo(kv_dtype).max
        k, v = (to_kv(x * 8, kv_dtype).to(x.dtype) for x in (k, v))
        k.view(-1)[::7], v.view(-1)[3::7] = far, -far
        pool = to_kv(pool, kv_dtype)
    rope = rq = rk = None
    if "rope" in name:  # a table as the model builds it; positions: each row's place in its sequence
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        freqs = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq.float())
        positions = torch.cat([torch.arange(c - n, c) for c, n in seqs])
        rope = Rope(torch.cat([freqs.cos(), freqs.sin()], dim=-1), positions)
        rq, rk = q.clone(), k.clone()
        apply_rope_(rq, rk, rope)  # the torch form, in q's dtype: what the kernel must write in place
    q0, k0 = q.clone(), k.clone()
    # the reference stores into an fp32 copy (f16 -> f32 is exact), or into a float8 pool of its own
    ref_pool = pool.clone() if is_float8(pool.dtype) else pool.float().clone()
    tri = TritonAttention(H, KVH, D, D**-0.5, prefill_attention=prefill_attention)
    if "splits" in name:
        tri.min_split_tokens, tri.programs_per_sm, tri.tuning = 16, 64, []
    splits = tri.num_splits(meta.num_decodes, meta.max_seq_len, q.device)
    out = torch.full_like(q, float("nan"))
    tri.forward(q, k, v, pool, meta, out=out, rope=rope)
    roped_in_place = rope is None or (bool(torch.equal(q, rq)) and bool(torch.equal(k, rk)))
    q, k = q0, k0  # the later calls rope (or not) afresh
    tri.forward(q.clone(), k.clone(), v, pool.clone(), meta, out=(again := torch.full_like(q, float("nan"))),
                rope=rope)  # the same again: nothing carried between launches
    if rope is not None:  # the reference ropes in q's dtype (as the model's rows are), then computes in float32
        q, k = rq, rk
    ref = ReferenceAttention(H, KVH, D, D**-0.5).forward(q.float(), k.float(), v.float(), ref_pool, meta)
    planned = tri.plan(meta)  # what the model does once per step: the same output with the shared tile map
    planned_out = torch.full_like(q, float("nan"))
    tri.forward(q, k, v, pool.clone(), planned, out=planned_out)
    # and forward really uses the planned map: one whose every tile exits leaves the prefill rows unwritten
    unwritten = torch.full_like(q, float("nan"))
    if planned.prefill_tile_map is not None:
        exits = dataclasses.replace(planned, prefill_tile_map=torch.full_like(planned.prefill_tile_map, -1))
        tri.forward(q, k, v, pool.clone(), exits, out=unwritten)
    return {"finite": bool(torch.isfinite(out).all()), "max_err": float((out.float() - ref).abs().max()),
            "pool_equal": bool(torch.equal(as_bytes(pool), as_bytes(ref_pool)) if is_float8(pool.dtype)
                               else torch.equal(pool.float(), ref_pool)),
            "planned_equal": bool(torch.equal(planned_out, out)), "splits": splits,
            "repeat_equal": bool(torch.equal(again, out)), "roped_in_place": roped_in_place,
            "planned_map": planned.prefill_tile_map is not None,
            "prefill_rows_unwritten_without_tiles": bool(torch.isnan(unwritten[meta.num_decodes:]).all())}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = {json.loads(line[7:])["name"]: json.loads(line[7:])
               for line in proc.stdout.splitlines() if line.startswith("RESULT ")}
    if proc.returncode or len(results) != len(ALL_CASES):
        pytest.fail(f"interpreter subprocess (rc {proc.returncode}) reported {sorted(results)}:\n{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_backend_equals_the_reference_under_the_interpreter(interpreted, case):
    got = interpreted[case[0]]
    assert got["repeat_equal"], "a second launch changed the output"
    assert got["roped_in_place"], "the KV store kernel's rope differs from the torch form (rapid.attention.rope)"
    assert got["finite"], f"unwritten or non-finite rows: {got}"
    assert got["pool_equal"], "the KV store wrote something other than the reference's store"
    # float8 cases: outputs up to the format's largest value (448 for e4m3), where float16's step is 0.25
    assert got["max_err"] < (FLOAT8_TOLERANCE if case[0].startswith("fp8") else TOLERANCE)[case[6]], got
    assert got["planned_equal"], "the step's shared tile map changed the output"
    seqs, prefill_attention = case[1], case[7]
    assert got["planned_map"] == (prefill_attention == "paged" and any(n > 1 for _, n in seqs)), got
    if got["planned_map"]:
        assert got["prefill_rows_unwritten_without_tiles"], "forward built its own tile map instead of the planned one"


def test_split_cases_cut_the_context(interpreted):
    """The split cases really run the split-KV path (pieces merged by the reduce kernel); the others one split."""
    assert all(interpreted[c[0]]["splits"] > 1 for c in SPLIT_CASES + FLOAT8_CASES if "splits" in c[0])
    assert interpreted["decode-one-f32"]["splits"] == 1


def test_decode_settings_follow_the_measured_tuning():
    """Batch 1 and batches past 64 keep the defaults (one masked loop); 2-64 take the sweep's 32-token tiles on 2
    warps, 2 stages, the whole tiles unmasked."""
    from rapid.attention.triton_backend import TritonAttention

    att = TritonAttention(32, 8, 128, 128**-0.5)
    defaults = dict(tile_n=att.tile_n, num_warps=att.num_warps, num_stages=att.num_stages,
                    programs_per_sm=att.programs_per_sm, unmasked_tiles=False)
    tuned = {**defaults, "tile_n": 32, "num_warps": 2, "num_stages": 2, "unmasked_tiles": True}
    assert att.decode_config(1) == defaults
    assert att.decode_config(2) == att.decode_config(64) == tuned
    assert att.decode_config(65) == att.decode_config(256) == defaults
    # over a float8 pool: the same up to 64; past it 2 warps at 2 stages (session 36's sweep at batch 256)
    assert [att.decode_config(b, float8=True) for b in (1, 2, 64)] == [defaults, tuned, tuned]
    assert att.decode_config(65, float8=True) == att.decode_config(256, float8=True) == {
        **defaults, "num_warps": 2, "num_stages": 2}


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for case in ALL_CASES:
        print("RESULT " + json.dumps({"name": case[0], **run_case(*case)}), flush=True)

