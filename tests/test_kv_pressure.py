"""KV pressure in every mode: a pool far too small for the load still finishes every request, with the tokens
an ample pool gives, and gives every block back (the KV-pressure deadlock, end to end).

One small-pool engine per (mode, prefix caching); pytest groups the tests by engine, so each starts once.
"""

import random
import time

import pytest

from rapid import LLM, SamplingParams
from rapid.protocol.engine import AddRequest
from tiny import hf_greedy

pytestmark = pytest.mark.slow

BLOCK_BYTES = 8192  # tiny_llama: 2 layers * (K, V) * 2 KV heads * head_dim 16 * 16 tokens * 4 bytes
SMALL_POOL = 12 * BLOCK_BYTES
DEADLINE_S = 60.0
# (mode, enable_prefix_caching); those without prefix caching come first: the preemption test shares them.
ENGINES = [("rapid", False), ("disagg", False), ("hybrid", False), ("rapid", True), ("disagg", True),
           ("hybrid", True)]
SHARED_PREFIX = 40
PARAMS = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def engine_id(key) -> str:
    mode, caching = key
    return f"{mode}-{'prefix-caching' if caching else 'no-prefix-caching'}"


def shared_prefix_prompts(n: int = 10, seed: int = 0) -> list[list[int]]:
    """n prompts: one 40-token prefix, then 2 to 6 tokens of their own (each needs 5 blocks at its longest)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(5, 300) for _ in range(SHARED_PREFIX)]
    return [prefix + [rng.randrange(5, 300) for _ in range(2 + i % 5)] for i in range(n)]


@pytest.fixture(scope="module")
def ample_reference(tiny_llama) -> list[list[int]]:
    """The shared-prefix load's greedy tokens from transformers (the oracle): what every small pool must give."""
    return [hf_greedy(tiny_llama, p, PARAMS.max_tokens) for p in shared_prefix_prompts()]


@pytest.fixture(scope="module", params=ENGINES, ids=engine_id)
def small_pool(request, tiny_llama):
    mode, caching = request.param
    with LLM(tiny_llama, mode=mode, kv_cache_memory_bytes=SMALL_POOL, enable_prefix_caching=caching) as llm:
        assert llm.engine.num_blocks == 12
        yield llm


def settled_stats(client, timeout_s: float = 5.0):
    """Stats once every block is free and no request is left, or after `timeout_s` (the workers answer
    asynchronously; in hybrid, get_deltas is what runs the engine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.get_stats()
        if (stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0) or time.monotonic() > deadline:
            return stats
        client.get_deltas(timeout_s=0.05)


def drive(llm, prompts, params, tag: str) -> dict[str, list[int]]:
    """Run the prompts through `llm.engine` with a wall-clock deadline; fail naming `tag` if any is stuck."""
    client = llm.engine
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        client.add_request(AddRequest(rid, p, params, arrival_time=time.time()))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    done = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            stuck = {rid: len(tokens[rid]) for rid in ids if rid not in done}
            try:
                s = client.get_stats()
                stats = (f"{s.num_free_blocks}/{s.num_blocks} blocks free, {s.num_requests} requests tracked, "
                         f"{s.num_preemptions} preemptions")
            except Exception as e:  # noqa: BLE001 - the report must not hide the hang
                stats = f"get_stats failed: {e!r}"
            client.abort(list(stuck))
            pytest.fail(f"{tag}: {len(stuck)} of {len(ids)} requests did not finish within {DEADLINE_S:g}s "
                        f"(request: tokens so far) {stuck}; stats: {stats}")
        for d in client.get_deltas(timeout_s=0.5):
            if d.request_id in tokens:
                tokens[d.request_id] += d.new_token_ids
                if d.finished:
                    done[d.request_id] = d
    errors = {rid: (d.finish_reason, d.error) for rid, d in done.items() if d.error or d.finish_reason != "length"}
    assert not errors, f"{tag}: requests ended badly: {errors}"
    return tokens


def test_shared_prefix_load_on_a_small_pool_finishes_like_an_ample_one(small_pool, ample_reference, request):
    """Ten requests sharing a 40-token prefix need 50 blocks at their longest (fewer with prefix caching): 12 make
    them queue and preempt. Every one must finish, token-identical to the ample pool, and free every block."""
    tag = request.node.callspec.id
    got = drive(small_pool, shared_prefix_prompts(), PARAMS, tag)
    assert list(got.values()) == ample_reference, f"{tag}: output differs from the ample pool's"
    stats = settled_stats(small_pool.engine)
    assert stats.num_free_blocks == stats.num_blocks, f"{tag}: {stats.num_free_blocks}/{stats.num_blocks} free"
    assert stats.num_requests == 0, f"{tag}: {stats.num_requests} requests still tracked"


@pytest.mark.parametrize("small_pool", ENGINES[:2], ids=engine_id, indirect=True)
def test_greedy_under_preemption_equals_transformers(small_pool, tiny_llama, request):
    """Modes rapid and disagg (each of its two pools has 12 blocks), no prefix caching. Each request needs
    7 or 8 blocks at its longest, so any two decoding at once overflow the 12 blocks: preemption is certain
    (whatever order the core admits them in), and recompute must not change a token."""
    ps = [[random.Random(4 + n).randrange(5, 300) for _ in range(n)] for n in (52, 60, 70, 57)]
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)
    client = small_pool.engine
    before = client.get_stats().num_preemptions
    got = drive(small_pool, ps, params, f"preemption-{request.node.callspec.id}")
    assert client.get_stats().num_preemptions > before
    assert list(got.values()) == [hf_greedy(tiny_llama, p, 45) for p in ps]
