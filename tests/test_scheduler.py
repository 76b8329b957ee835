"""Scheduler and block manager alone, with factory-built requests (no model, no tensors)."""

import itertools

import pytest

from rapid.config import SchedulerConfig
from rapid.runtime.block_manager import BlockManager
from rapid.runtime.request import Request, RequestStatus
from rapid.runtime.scheduler import Scheduler
from rapid.sampling import SamplingParams

_ids = itertools.count()


def make_request(prompt_len=10, max_tokens=5, tokens=None, **params) -> Request:
    tokens = tokens if tokens is not None else [(7 * i + 3) % 100 for i in range(prompt_len)]
    return Request(f"r{next(_ids)}", list(tokens), SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=(0,))


def make_scheduler(num_blocks=64, block_size=4, max_seqs=8, budget=64, max_len=256, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len), bm), bm


def run_step(sched: Scheduler, token=5):
    out = sched.schedule()
    sampled = {c.request.request_id: token for c in out.chunks if c.samples}
    return out, sched.update(out, sampled)


def test_num_decodes_counts_requests_generating_not_one_token_prompts():
    sched, _ = make_scheduler()
    one, longer = make_request(prompt_len=1, max_tokens=3), make_request(prompt_len=6, max_tokens=3)
    sched.add_request(one)
    sched.add_request(longer)
    out = sched.schedule()  # two prompts, one of a single token: no decode yet
    assert out.num_decodes == 0 and out.num_batched_tokens == 7
    sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples})
    out = sched.schedule()  # both now generate
    assert out.num_decodes == 2 and out.num_batched_tokens == 2


def test_prefill_then_decode_and_finish_frees_blocks():
    sched, bm = make_scheduler()
    req = make_request(prompt_len=10, max_tokens=3)
    sched.add_request(req)
    out, _ = run_step(sched)
    assert [(c.request, c.num_tokens) for c in out.chunks] == [(req, 10)]
    assert req.output_token_ids == [5] and len(req.block_ids) == 3  # 10 tokens, blocks of 4
    out, _ = run_step(sched)
    assert out.chunks[0].num_tokens == 1 and out.num_decodes == 1
    out, finished = run_step(sched)
    assert finished == [(req, "length")] and req.status == RequestStatus.FINISHED
    assert bm.num_free_blocks == bm.num_blocks


def test_chunked_prefill_under_token_budget_and_decodes_first():
    sched, _ = make_scheduler(budget=8)
    a = make_request(prompt_len=4, max_tokens=10)
    sched.add_request(a)
    run_step(sched)  # a prefilled, now decoding
    b = make_request(tokens=list(range(50, 70)), max_tokens=2)  # shares no prefix with a
    sched.add_request(b)
    sizes = []
    while b.num_computed_tokens < 20:
        out, _ = run_step(sched)
        assert out.chunks[0].request is a and out.chunks[0].num_tokens == 1  # decode first
        assert out.num_batched_tokens <= 8
        sizes.append(out.chunks[1].num_tokens)
    assert sizes == [7, 7, 6] and len(b.output_token_ids) == 1


def test_eos_and_stop_token_ids_finish():
    sched, _ = make_scheduler()
    a = make_request(max_tokens=10)
    b = make_request(max_tokens=10, stop_token_ids=[9])
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    finished = sched.update(out, {a.request_id: 0, b.request_id: 9})
    assert {(r.request_id, why) for r, why in finished} == {(a.request_id, "stop"), (b.request_id, "stop")}
    assert a.stop_reason is None and b.stop_reason == 9


def test_min_tokens_ignores_eos():
    sched, _ = make_scheduler()
    a = make_request(max_tokens=10, min_tokens=2)
    sched.add_request(a)
    _, fin = run_step(sched, token=0)
    assert fin == []
    _, fin = run_step(sched, token=0)
    assert fin == [(a, "stop")]


def test_preemption_by_recompute_when_blocks_run_out():
    sched, bm = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a, b = make_request(prompt_len=8, max_tokens=12), make_request(prompt_len=8, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    for _ in range(40):
        if not sched.has_unfinished():
            break
        out, _ = run_step(sched)
        preempted += out.preempted
        assert bm.num_free_blocks >= 0
    assert not sched.has_unfinished()
    assert preempted and preempted[0] is b  # the newest goes first
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert b.num_preemptions >= 1
    assert bm.num_free_blocks == bm.num_blocks


def test_request_that_can_never_fit_is_rejected_up_front():
    sched, _ = make_scheduler(num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(make_request(prompt_len=90, max_tokens=20))
    with pytest.raises(ValueError, match="whole pool has 4"):
        sched.add_request(make_request(prompt_len=10, max_tokens=20))
    assert not sched.has_unfinished()


def test_prefix_cache_hits_are_reported_and_shared():
    sched, bm = make_scheduler(block_size=4)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    a = make_request(tokens=prompt, max_tokens=1)
    sched.add_request(a)
    run_step(sched)  # a finishes after one token; its full blocks stay cached
    b = make_request(tokens=prompt[:13] + [99], max_tokens=1)
    sched.add_request(b)
    out, _ = run_step(sched)
    assert b.num_cached_tokens == 12 and out.chunks[0].num_tokens == 2
    c = make_request(tokens=[50] + prompt[1:], max_tokens=1)  # differs in block 0: no hit
    sched.add_request(c)
    run_step(sched)
    assert c.num_cached_tokens == 0


def test_prefix_cache_leaves_one_token_to_compute_and_can_be_disabled():
    sched, _ = make_scheduler(block_size=4)
    prompt = list(range(1, 9))  # exactly 2 blocks
    for expect in (0, 4):
        r = make_request(tokens=prompt, max_tokens=1)
        sched.add_request(r)
        run_step(sched)
        assert r.num_cached_tokens == expect
    sched, _ = make_scheduler(block_size=4, prefix=False)
    for _ in range(2):
        r = make_request(tokens=prompt, max_tokens=1)
        sched.add_request(r)
        run_step(sched)
        assert r.num_cached_tokens == 0


def test_abort_at_every_stage_frees_blocks():
    sched, bm = make_scheduler(budget=6)
    waiting = make_request(prompt_len=10)
    sched.add_request(waiting)
    sched.abort_request(waiting.request_id)
    assert waiting.finish_reason == "abort" and bm.num_free_blocks == bm.num_blocks
    prefilling = make_request(prompt_len=20)
    sched.add_request(prefilling)
    run_step(sched)
    assert 0 < prefilling.num_computed_tokens < 20
    sched.abort_request(prefilling.request_id)
    decoding = make_request(prompt_len=4, max_tokens=10)
    sched.add_request(decoding)
    run_step(sched)
    run_step(sched)
    sched.abort_request(decoding.request_id)
    assert bm.num_free_blocks == bm.num_blocks and not sched.has_unfinished()


def test_max_num_seqs_caps_the_running_batch():
    sched, _ = make_scheduler(max_seqs=2)
    reqs = [make_request(prompt_len=4, max_tokens=4) for _ in range(3)]
    for r in reqs:
        sched.add_request(r)
    out, _ = run_step(sched)
    assert len(out.chunks) == 2 and reqs[2].status == RequestStatus.WAITING
