"""The exponential race (rapid/worker/exponential_race.py): its hash, its noise, its draws, and the Triton kernel
(rapid/worker/exponential_race_kernel.py) against the tensor code, on the CPU through Triton's interpreter (in a
subprocess: TRITON_INTERPRET=1 is read when the kernel module is imported, which other tests may have done)."""

from __future__ import annotations

import json
import os

import torch
from triton_interpreted import interpreted_results

from rapid.worker.exponential_race import _hash32, hashed_exponential, race_argmax_reference, sample_race


def lowbias32(x: int) -> int:
    """The hash in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_tensor_hash_is_lowbias32_without_overflow():
    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFE, 0xFFFFFFFF, 123456789]
    got = _hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]
    assert all(0 <= h <= 0xFFFFFFFF for h in got)


def test_draws_follow_the_softmax_and_depend_only_on_the_key():
    V, n = 6, 60000
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -3.0])
    scale = torch.full((n,), 0.7)
    keys = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(0))
    tokens = race_argmax_reference(logits.expand(n, V), scale, keys)
    freq = torch.bincount(tokens, minlength=V).float() / n
    want = torch.softmax(logits * 0.7, dim=0)
    assert (freq - want).abs().max() < 0.01, (freq, want)
    # a row's draw is a function of its key: the same key in another batch, at another position, agrees
    again = race_argmax_reference(logits.expand(50, V).flip(0), scale[:50], keys[:50].flip(0))
    assert again.flip(0).tolist() == tokens[:50].tolist()


def test_masked_tokens_never_win_and_ties_go_to_the_first():
    n = 2000
    x = torch.full((n, 8), float("-inf"))
    x[:, 5] = 0.0
    x[:, 2] = 0.0
    keys = torch.arange(n, dtype=torch.int64) * 7919
    tokens = race_argmax_reference(x, torch.ones(n), keys)
    assert set(tokens.tolist()) == {2, 5}  # only the two allowed, both drawn
    # every score -inf (a fully masked row): token 0, as torch.argmax
    assert race_argmax_reference(torch.full((1, 4), float("-inf")), torch.ones(1), keys[:1]).tolist() == [0]


def test_every_hashed_uniform_is_strictly_inside_0_1():
    """All 2**23 values u can take: none is 1 (q = 0 would make its token win whatever its logit) or 0."""
    k = torch.arange(1 << 23, dtype=torch.int64)
    u = (k.to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # the formula of hashed_exponential, h >> 9 = k
    assert u.max().item() < 1.0 and u.min().item() > 0.0
    assert torch.isfinite(torch.log(-torch.log(u))).all()


def test_masked_tokens_never_win_over_a_large_vocabulary():
    V = 151_936
    x = torch.full((40, V), float("-inf"))
    allowed = torch.tensor([3, 70_000, 151_935])
    x[:, allowed] = torch.randn(40, 3)
    keys = torch.randint(0, 2**62, (40,), generator=torch.Generator().manual_seed(5))
    assert set(race_argmax_reference(x, torch.ones(40), keys).tolist()) <= set(allowed.tolist())
    q = hashed_exponential(keys[:4], V)
    assert torch.isfinite(q).all() and (q > 0).all()


def test_small_keys_do_not_starve_a_token():
    """Keys below 2**32 (high word 0) draw token 0 as often as any other: the per-row words must not cancel."""
    n, V = 20_000, 8
    tokens = race_argmax_reference(torch.zeros(n, V), torch.ones(n), torch.arange(n, dtype=torch.int64))
    freq = torch.bincount(tokens, minlength=V).float() / n
    assert (freq - 1 / V).abs().max() < 0.015, freq


def test_cpu_sampling_hashes_seeded_rows_only():
    """On the CPU a seeded row draws what the hash gives its key; the other rows draw from the generator."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 300, generator=g) * 2
    keys = [11, 2**62 + 5]
    got = sample_race(x, torch.ones(6), torch.Generator().manual_seed(0), [1, 4], keys)
    want = race_argmax_reference(x[[1, 4]], torch.ones(2), torch.tensor(keys))
    assert got[[1, 4]].tolist() == want.tolist()
    other = sample_race(x, torch.ones(6), torch.Generator().manual_seed(9), [1, 4], keys)
    assert other[[1, 4]].tolist() == want.tolist() and other.tolist() != got.tolist()  # unseeded rows moved


# (rows, vocab, parts, block, masked share): one part; parts that do not divide the vocabulary; small blocks
KERNEL_CASES = [(3, 500, 1, 128, 0.0), (4, 1000, 3, 64, 0.3), (2, 4099, 5, 256, 0.9), (6, 77, 4, 16, 0.0)]


def run_kernel_cases() -> list[dict]:
    from rapid.worker.exponential_race_kernel import launch_race  # in the interpreter subprocess only

    out = []
    for i, (B, V, parts, block, masked) in enumerate(KERNEL_CASES):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(B, V, generator=g) * 3
        x[torch.rand(B, V, generator=g) < masked] = float("-inf")
        scale = torch.rand(B, generator=g) + 0.2
        keys = torch.randint(0, 2**62, (B,), generator=g)
        keys[0] = 2**63 - 1  # the top bit range of a key
        want = race_argmax_reference(x, scale, keys).tolist()
        got = launch_race(x, scale, keys, parts=parts, block=block).tolist()
        out.append({"case": i, "want": want, "got": got})
    return out


def test_triton_kernel_equals_the_tensor_code_under_the_interpreter():
    lines = interpreted_results(__file__, len(KERNEL_CASES))
    for r in lines:
        assert r["got"] == r["want"], r


if __name__ == "__main__":  # the interpreter subprocess
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    for r in run_kernel_cases():
        print("RESULT " + json.dumps(r), flush=True)
