"""The one engine core alone, driven by fake workers: abort at every stage frees every block, hand-off,
block grants, preemption by recompute, placement of prefill in either lane. Deterministic, no processes."""

import pytest

from fakes import add, finish_prefill, make_core
from rapid.core.request import RequestStatus
from rapid.engine.core_process import _handle
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest, RequestDelta
from rapid.protocol.worker import (
    DecodeStep, Dropped, GrantBlocks, PrefillDone, SampledToken, StartDecode, StopDecode,
)

S = RequestStatus


def all_free(core):
    return core.blocks.num_free_blocks == core.blocks.num_blocks and not core.requests


def test_prefill_hand_off_decode_and_finish():
    core, w = make_core()
    add(core, "a", n_prompt=10, max_tokens=3)
    core.dispatch()
    assert len(w.prefill) == 1 and w.prefill[0].work[0].token_ids == list(range(2, 12))
    finish_prefill(core, w)
    start = w.decode[-1]
    assert isinstance(start, StartDecode) and start.output_token_ids == [7]
    assert len(start.block_ids) == 4  # 11 tokens + 1 lookahead block of 4 -> 15 tokens -> 4 blocks
    assert core.status("a") == S.DECODING
    core.deliver(DecodeStep([SampledToken("a", 8, -0.1)], [], 0.0, 1.0))
    core.deliver(DecodeStep([SampledToken("a", 9, -0.1)], ["a"], 1.0, 2.0))  # worker ended it (length)
    deltas = core.take_deltas()
    assert [d.new_token_ids for d in deltas] == [[], [7], [8], [9]]  # first: scheduled (its prefill batch went out)
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert all_free(core)


def test_first_scheduled_time_is_stamped_when_a_batch_first_takes_the_request():
    """RequestDelta.first_scheduled_time (where vLLM's queue time ends; the server's metrics count the request as
    running from then on): stamped when a prefill batch first takes the request and said at once, in a delta with
    nothing else (is_empty), unless output came in that same step; none while queued; every later delta carries it."""
    core, w = make_core(budget=10)
    add(core, "a", n_prompt=10, max_tokens=3)
    add(core, "b", n_prompt=10, max_tokens=3)  # queued behind a (the budget holds one prompt)
    core.dispatch()
    (sched,) = core.take_deltas()
    assert sched.request_id == "a" and sched.is_empty and not sched.finished
    assert sched.first_scheduled_time >= sched.arrival_time > 0
    assert core.requests["b"].first_scheduled_time == 0.0
    finish_prefill(core, w)  # a's first token
    (first,) = core.take_deltas()
    assert first.new_token_ids == [7] and first.first_scheduled_time == sched.first_scheduled_time

    def answer_at_once(timeout_ms=0):  # as hybrid's in-process executor may: the batch runs within the step
        batch = w.prefill[-1]
        return [PrefillDone(batch.batch_id, [SampledToken(x.request_id, 7, -0.5) for x in batch.work if x.sample],
                            0.0, 1.0, num_tokens=sum(len(x.token_ids) for x in batch.work))]

    w.poll = answer_at_once
    core.dispatch()
    del w.poll
    b = [d for d in core.take_deltas() if d.request_id == "b"]
    assert [d.new_token_ids for d in b] == [[7]]  # one delta: its token says it was scheduled too
    assert b[0].first_scheduled_time >= sched.first_scheduled_time
    assert not any(d.is_empty for d in [first, *b]) and RequestDelta("x", [], "").first_scheduled_time == 0.0


def test_abort_while_queued():
    core, w = make_core(budget=10)
    add(core, "a", n_prompt=10)
    add(core, "b", n_prompt=10)
    core.dispatch()  # only a fits the budget; b waits
    assert [x.request_id for x in w.prefill[0].work] == ["a"]
    core.abort(["b"])
    assert core.take_deltas()[-1].finish_reason == "abort"
    assert "b" not in core.requests


def test_abort_while_prefilling_frees_after_the_batch_returns():
    core, w = make_core()
    add(core, "a", n_prompt=10)
    core.dispatch()
    core.abort(["a"])
    assert core.take_deltas()[-1].finish_reason == "abort"
    assert core.blocks.num_free_blocks < core.blocks.num_blocks  # the worker may still write them
    finish_prefill(core, w)
    assert all_free(core)
    assert not [m for m in w.decode if isinstance(m, StartDecode)]


def test_abort_of_a_partially_prefilled_request_between_chunks():
    core, w = make_core(budget=4)
    add(core, "a", n_prompt=10)
    core.dispatch()
    finish_prefill(core, w)  # first chunk of 4 done, not in flight now
    assert len(w.prefill) == 1 and core.requests["a"].num_computed_tokens == 4
    core.abort(["a"])
    assert all_free(core)


def test_abort_after_hand_off_waits_for_dropped():
    core, w = make_core()
    add(core, "a")
    core.dispatch()
    finish_prefill(core, w)
    core.abort(["a"])
    assert isinstance(w.decode[-1], StopDecode) and w.decode[-1].request_ids == ["a"]
    assert core.status("a") == S.STOPPING and not all_free(core)
    # a token the worker produced before it saw the stop is ignored
    core.deliver(DecodeStep([SampledToken("a", 5, -1.0)], [], 0.0, 1.0))
    assert not [d for d in core.take_deltas() if d.new_token_ids == [5]]
    core.deliver(Dropped(["a"]))
    assert all_free(core)


def test_abort_while_decoding():
    core, w = make_core()
    add(core, "a", max_tokens=20)
    core.dispatch()
    finish_prefill(core, w)
    for t in range(3):
        core.deliver(DecodeStep([SampledToken("a", 10 + t, -1.0)], [], 0.0, 1.0))
    core.abort(["a"])
    core.deliver(Dropped(["a"]))
    assert all_free(core)


def test_blocks_granted_ahead_of_decoding():
    core, w = make_core(lookahead=1)
    add(core, "a", n_prompt=10, max_tokens=20)
    core.dispatch()
    finish_prefill(core, w)
    held = len(w.decode[-1].block_ids)
    grants = []
    for t in range(8):
        core.deliver(DecodeStep([SampledToken("a", 10 + t, -1.0)], [], 0.0, 1.0))
        grants += [m for m in w.decode if isinstance(m, GrantBlocks) and m not in grants]
    req, table = core.requests["a"], core.blocks.block_table("a")
    assert grants and held + sum(len(g.block_ids) for g in grants) == len(table)
    assert len(table) * 4 >= req.num_tokens + 1  # always room for the next token


def test_preemption_when_the_pool_runs_out_recomputes_the_newest():
    core, w = make_core(num_blocks=9, lookahead=1)
    add(core, "a", n_prompt=8, max_tokens=20)
    add(core, "b", n_prompt=8, max_tokens=20)
    core.dispatch()
    finish_prefill(core, w)
    assert {m.request_id for m in w.decode if isinstance(m, StartDecode)} == {"a", "b"}
    stopped = []
    for t in range(12):
        running = [rid for rid, r in core.requests.items() if r.status == S.DECODING]
        core.deliver(DecodeStep([SampledToken(r, 20 + t, -1.0) for r in running], [], 0.0, 1.0))
        for m in w.decode:
            if isinstance(m, StopDecode) and m not in stopped:
                stopped.append(m)
                core.deliver(Dropped(m.request_ids))
        if stopped:
            break
    assert stopped and stopped[0].request_ids == ["b"]  # the newest is preempted
    b = core.requests["b"]
    assert b.num_preemptions == 1 and b.output_token_ids  # outputs kept: recomputed from prompt + outputs
    stamp = b.first_scheduled_time
    core.dispatch()
    assert stamp and b.first_scheduled_time == stamp  # scheduled again: its queue time still ended the first time
    redo = [x for x in w.prefill[-1].work if x.request_id == "b"]
    assert redo and redo[0].start_pos + len(redo[0].token_ids) == b.num_tokens  # requeued and prefilled again
    assert core.get_stats().num_preemptions == 1


def test_unfit_request_is_rejected_with_an_error_delta():
    core, _ = make_core(num_blocks=4)
    with pytest.raises(ValueError, match="whole pool has 4"):
        add(core, "big", n_prompt=10, max_tokens=20)
    assert not core.requests
    # the engine-core process answers the same refusal with an error delta (the frontend checks first)
    msg = AddRequest("big", list(range(10)), SamplingParams(max_tokens=20))
    running, (delta,) = _handle(core.core, msg, outbox=None)
    assert running and delta.finished and "whole pool has 4" in delta.error


@pytest.mark.parametrize("stage", ["queued", "prefilling", "handed_off", "decoding"])
def test_every_stage_abort_leaves_pool_whole(stage):
    core, w = make_core(budget=10)
    add(core, "x", n_prompt=10, max_tokens=30)
    add(core, "y", n_prompt=10, max_tokens=30)  # queued behind x
    target = "y" if stage == "queued" else "x"
    core.dispatch()
    if stage in ("handed_off", "decoding"):
        finish_prefill(core, w)
    if stage == "decoding":
        core.deliver(DecodeStep([SampledToken("x", 3, -1.0)], [], 0.0, 1.0))
    core.abort([target])
    if stage == "prefilling":
        finish_prefill(core, w)
    if stage in ("handed_off", "decoding"):
        core.deliver(Dropped([target]))
    assert target not in core.requests
    core.abort(["x", "y"])
    if core.scheduler.in_flight:
        finish_prefill(core, w)
    for rid in [rid for rid, r in core.requests.items() if r.status == S.STOPPING]:
        core.deliver(Dropped([rid]))
    assert all_free(core)


def test_a_worker_finish_racing_a_preemption_waits_for_the_dropped_answer():
    """The core preempts b (StopDecode) while the decode worker, not yet having seen it, ends b itself. The
    worker still answers the StopDecode with Dropped; b's blocks must stay held until every StopDecode sent
    for b is answered, else a late Dropped frees the blocks of b's next incarnation under the worker."""
    core, w = make_core(num_blocks=9, lookahead=1)
    add(core, "a", n_prompt=8, max_tokens=20)
    add(core, "b", n_prompt=8, max_tokens=20)
    core.dispatch()
    finish_prefill(core, w)
    stops = lambda: [m for m in w.decode if isinstance(m, StopDecode) and "b" in m.request_ids]  # noqa: E731
    for t in range(12):
        running = [rid for rid, r in core.requests.items() if r.status == S.DECODING]
        core.deliver(DecodeStep([SampledToken(r, 20 + t, -1.0) for r in running], [], 0.0, 1.0))
        if stops():
            break
    assert len(stops()) == 1 and core.status("b") == S.PREEMPTED
    # sent before the worker saw the stop: it ended a (making room) and b by themselves
    core.deliver(DecodeStep([SampledToken("a", 0, -1.0), SampledToken("b", 0, -1.0)], ["a", "b"], 0.0, 1.0))
    core.dispatch()
    if w.prefill and any(x.request_id == "b" for x in w.prefill[-1].work) and core.scheduler.in_flight:
        finish_prefill(core, w)  # b recomputed and handed off again ...
        if core.requests["b"].status == S.DECODING:
            core.abort(["b"])  # ... and stopped again: a second StopDecode, not yet answered
    answered = 1
    core.deliver(Dropped(["b"]))  # the worker's answer to the first StopDecode
    if len(stops()) > answered:
        assert "b" in core.requests and core.blocks.block_table("b"), "b's blocks freed under the worker"
    for _ in range(len(stops()) - answered):
        core.deliver(Dropped(["b"]))
    if core.scheduler.in_flight:
        finish_prefill(core, w)
    core.abort(list(core.requests))
    for rid in [rid for rid, r in core.requests.items() if r.status == S.STOPPING]:
        core.deliver(Dropped([rid]))
    assert all_free(core)
