"""Mode 'disagg' on the CPU: prefill and decode workers each own a pool; KV is copied at hand-off."""

import os
import random

import pytest

from rapid import LLM, SamplingParams
from fakes import finish_prefill, make_core
from rapid.protocol.engine import AddRequest
from rapid.protocol.worker import StartDecode, Transferred
from tiny import engine_pids, gone, hf_greedy, shm_of

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)


def prompts(seed=0, lengths=(1, 7, 33, 70)):
    rng = random.Random(seed)
    return [[rng.randrange(5, 300) for _ in range(n)] for n in lengths]


@pytest.mark.slow
def test_disagg_greedy_equals_transformers_and_frees_both_pools(tiny_llama):
    ps = prompts()
    with LLM(tiny_llama, mode="disagg", max_num_batched_tokens=32) as llm:
        client = llm.engine
        assert len(client.shm_names) == 2  # two arenas: one per worker
        shm_names, sock_dir = list(client.shm_names), client.dir
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], GREEDY, use_tqdm=False)
        seeded = llm.generate([{"prompt_token_ids": p} for p in ps], SEEDED, use_tqdm=False)
        stats = client.get_stats()
        pids = list(engine_pids(llm).values())
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(tiny_llama, p, 12) for p in ps]
    with LLM(tiny_llama) as hybrid:  # a request's own seed gives its draws in any batch: the same as hybrid's
        expected = hybrid.generate([{"prompt_token_ids": p} for p in ps], SEEDED, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in seeded] == [o.outputs[0].token_ids for o in expected]
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0
    assert all(gone(p) for p in pids)
    assert not shm_of(pids, shm_names)
    assert not os.path.exists(sock_dir)


def test_core_holds_prefill_blocks_until_transferred():
    core, w = make_core(num_blocks=16, num_decode_blocks=16, mode="disagg", max_model_len=128)
    core.add_request(AddRequest("a", list(range(1, 11)), SamplingParams(max_tokens=4, ignore_eos=True)))
    core.dispatch()
    finish_prefill(core, w)
    start = w.decode[-1]
    sched = core.scheduler
    assert isinstance(start, StartDecode) and len(start.src_block_ids) == 3
    assert sched.blocks.num_free_blocks == 13  # prefill blocks kept until the copy is done
    assert sched.decode_blocks.num_free_blocks == 16 - len(start.block_ids)
    core.deliver(Transferred(["a"]))
    assert sched.blocks.num_free_blocks == 16
