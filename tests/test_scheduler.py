"""The one scheduler with hybrid placement, driven through the real engine core and decode executor over a
fake model runner (no model, no tensors): chunking, decodes first, finish rules, preemption, prefix cache,
abort, the KV-pressure deadlock."""

import itertools

import pytest

from rapid.config import CacheConfig, EngineConfig, RapidConfig, SchedulerConfig
from rapid.core.block_manager import BlockManager
from rapid.core.placement import DECODE, PREFILL, Placement, StaticPlacement
from rapid.core.request import Request
from rapid.core.scheduler import Scheduler
from rapid.core.request import RequestStatus
from rapid.engine.core import EngineCore
from rapid.engine.inproc import InprocWorkers
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest
from rapid.protocol.worker import Dropped, PrefillBatch, PrefillDone, SampledToken
from rapid.worker.decode_loop import DecodeLoop

_ids = itertools.count()


class FakeRunner:
    """Records each forward pass's work; samples `token` (or a per-request override) for every sampling row."""

    def __init__(self, token=5):
        self.token = token
        self.tokens: dict[str, int] = {}
        self.steps: list[list] = []

    def launch(self, work, inputs_from=None):
        self.steps.append(list(work))
        return [SampledToken(w.request_id, self.tokens.get(w.request_id, self.token), -0.5) for w in work if w.sample]

    def collect(self, launched):
        return launched

    def device_time(self, launched):
        return None


class Engine:
    def __init__(self, num_blocks=64, block_size=4, max_seqs=8, budget=64, max_len=256, prefix=True, lookahead=1,
                 async_scheduling=False, reserve=0.0):
        cfg = EngineConfig(model="m", tokenizer=None, mode="hybrid", async_scheduling=async_scheduling,
                           cache=CacheConfig(block_size=block_size, enable_prefix_caching=prefix),
                           scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                                     max_model_len=max_len, admission_reserve=reserve),
                           rapid=RapidConfig(decode_lookahead_blocks=lookahead))
        self.runner = FakeRunner()
        self.core = EngineCore(cfg, None, (0,), InprocWorkers(DecodeLoop(self.runner, cfg, (0,))), num_blocks)
        self.scheduler = self.core.scheduler
        self.blocks = self.scheduler.blocks
        self.finished: dict[str, str] = {}

    def add(self, prompt_len=10, max_tokens=5, tokens=None, **params):
        tokens = tokens if tokens is not None else [(7 * i + 3) % 100 for i in range(prompt_len)]
        rid = f"r{next(_ids)}"
        self.core.add_request(AddRequest(rid, list(tokens), SamplingParams(max_tokens=max_tokens, **params)))
        return self.scheduler.requests[rid]

    def forward(self, token=None):
        """Run engine steps until one forward pass ran; return its work [(request id, num tokens)]."""
        if token is not None:
            self.runner.token = token
        before = len(self.runner.steps)
        for _ in range(5):
            for d in self.core.step():
                if d.finished:
                    self.finished[d.request_id] = d.finish_reason
            if len(self.runner.steps) > before:
                return [(w.request_id, len(w.token_ids)) for w in self.runner.steps[-1]]
        return []

    def drain(self, limit=500):
        for _ in range(limit):
            if not self.core.has_unfinished():
                return
            self.forward()
        raise AssertionError("the engine did not finish its requests")


def test_prefill_then_decode_and_finish_frees_blocks():
    e = Engine()
    req = e.add(prompt_len=10, max_tokens=3)
    assert e.forward() == [(req.request_id, 10)]
    assert req.output_token_ids == [5]
    assert e.forward() == [(req.request_id, 1)]  # handed to the decode executor: one token per step
    e.forward()
    assert e.finished == {req.request_id: "length"} and req.status == RequestStatus.FINISHED
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


def test_chunked_prefill_under_token_budget_and_decodes_first():
    e = Engine(budget=8)
    a = e.add(prompt_len=4, max_tokens=10)
    e.forward()
    e.forward()  # a decoding
    b = e.add(tokens=list(range(50, 70)), max_tokens=2)  # shares no prefix with a
    sizes = []
    while b.num_computed_tokens < 20:
        work = e.forward()
        assert work[0] == (a.request_id, 1)  # the decode first
        assert sum(n for _, n in work) <= 8  # the budget covers decodes and chunks
        sizes.append(work[1][1])
    assert sizes == [7, 7, 6] and len(b.output_token_ids) == 1


def test_eos_and_stop_token_ids_finish():
    e = Engine()
    a = e.add(max_tokens=10)
    b = e.add(max_tokens=10, stop_token_ids=[9])
    e.runner.tokens = {a.request_id: 0, b.request_id: 9}
    e.forward()
    assert e.finished == {a.request_id: "stop", b.request_id: "stop"}
    assert a.stop_reason is None and b.stop_reason == 9


def test_min_tokens_ignores_eos():
    e = Engine()
    a = e.add(max_tokens=10, min_tokens=2)
    e.forward(token=0)
    assert not e.finished
    e.forward(token=0)
    assert e.finished == {a.request_id: "stop"}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_by_recompute_when_blocks_run_out(async_scheduling):
    e = Engine(num_blocks=6, block_size=4, budget=64, async_scheduling=async_scheduling)
    a, b = e.add(prompt_len=8, max_tokens=12), e.add(prompt_len=8, max_tokens=12)
    e.drain()
    assert e.scheduler.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0  # newest first
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_full_admission_reserve_never_preempts(async_scheduling):
    """The pool of the preemption test above (6 blocks of 4) holds one 8 + 12 token request: with the whole
    max_tokens reserved the second waits for the first instead of being preempted and recomputed."""
    e = Engine(num_blocks=6, block_size=4, budget=64, async_scheduling=async_scheduling, reserve=1.0)
    a, b = e.add(prompt_len=8, max_tokens=12), e.add(prompt_len=8, max_tokens=12)
    e.forward()
    assert a.status == RequestStatus.DECODING and b.status == RequestStatus.WAITING
    e.drain()
    assert e.scheduler.num_preemptions == 0 and len(b.output_token_ids) == 12
    assert e.blocks.num_free_blocks == e.blocks.num_blocks and not e.scheduler.reserve.expected


def test_admission_reserve_admits_what_the_pool_holds_at_that_share():
    """32 blocks of 4: requests of 8 prompt + 16 max_tokens take 6 blocks at the end, 4 with half reserved, 2
    without: 5, 8 and (the max_num_seqs cap) 10 of them are admitted together, and only the last preempts."""
    admitted, preempted = {}, {}
    for reserve in (1.0, 0.5, 0.0):
        e = Engine(num_blocks=32, block_size=4, max_seqs=10, budget=256, reserve=reserve)
        reqs = [e.add(prompt_len=8, max_tokens=16) for _ in range(12)]
        admitted[reserve] = len(e.forward())  # the first step prefills every admitted prompt
        e.drain()
        preempted[reserve] = e.scheduler.num_preemptions
        assert all(len(r.output_token_ids) == 16 for r in reqs)
    assert admitted == {1.0: 5, 0.5: 8, 0.0: 10}
    assert preempted[1.0] == 0 and preempted[0.0] > 0


def test_request_that_can_never_fit_is_rejected_up_front():
    e = Engine(num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        e.add(prompt_len=90, max_tokens=20)
    with pytest.raises(ValueError, match="whole pool has 4"):
        e.add(prompt_len=10, max_tokens=20)
    assert not e.core.has_unfinished()


def test_prefix_cache_hits_are_reported_and_shared():
    e = Engine(block_size=4)
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks
    e.add(tokens=prompt, max_tokens=1)
    e.drain()  # finishes after one token; its full blocks stay cached
    b = e.add(tokens=prompt[:13] + [99], max_tokens=1)
    assert e.forward() == [(b.request_id, 2)]
    assert b.num_cached_tokens == 12
    c = e.add(tokens=[50] + prompt[1:], max_tokens=1)  # differs in block 0: no hit
    e.drain()
    assert c.num_cached_tokens == 0


def test_prefix_cache_leaves_one_token_to_compute_and_can_be_disabled():
    prompt = list(range(1, 9))  # exactly 2 blocks
    for prefix, expected in ((True, (0, 4)), (False, (0, 0))):
        e = Engine(block_size=4, prefix=prefix)
        for expect in expected:
            r = e.add(tokens=prompt, max_tokens=1)
            e.drain()
            assert r.num_cached_tokens == expect


def test_abort_at_every_stage_frees_blocks():
    e = Engine(budget=6)
    waiting = e.add(prompt_len=10)
    e.core.abort([waiting.request_id])
    assert waiting.finish_reason == "abort" and e.blocks.num_free_blocks == e.blocks.num_blocks
    prefilling = e.add(prompt_len=20)
    e.forward()
    assert 0 < prefilling.num_computed_tokens < 20
    e.core.abort([prefilling.request_id])
    e.forward()  # the chunk in flight comes back; its blocks are freed then
    decoding = e.add(prompt_len=4, max_tokens=10)
    e.forward()
    e.forward()
    e.core.abort([decoding.request_id])
    e.forward()  # the executor drops it (Dropped) and the blocks come back
    assert e.blocks.num_free_blocks == e.blocks.num_blocks and not e.core.has_unfinished()


def test_max_num_seqs_caps_the_running_batch():
    e = Engine(max_seqs=2)
    reqs = [e.add(prompt_len=4, max_tokens=4) for _ in range(3)]
    assert len(e.forward()) == 2 and reqs[2].status == RequestStatus.WAITING


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("prefix", [True, False])
def test_shared_prefixes_under_a_tiny_pool_finish_and_free_every_block(prefix, async_scheduling):
    """The KV-pressure deadlock: requests waiting for blocks must not hold the prefix-cache hits they took."""
    shared = list(range(1, 33))  # two full blocks of 16 shared by every prompt
    e = Engine(num_blocks=12, block_size=16, budget=64, prefix=prefix, lookahead=2, async_scheduling=async_scheduling)
    reqs = [e.add(tokens=shared + [100 + i] * (5 + i), max_tokens=40, ignore_eos=True) for i in range(10)]
    e.drain(limit=3000)
    assert all(len(r.output_token_ids) == 40 for r in reqs)
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


def test_waiting_request_gives_back_prefix_hits_it_cannot_use():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256), bm)
    prompt = list(range(1, 13))  # 3 full blocks, cached below
    bm.match_prefix("seed", prompt + [0])
    bm.allocate("seed", 13)
    bm.commit("seed", prompt + [0], 13)
    bm.free("seed")
    bm.allocate("holder", 16)  # 4 fresh blocks held by someone else: 4 free, 3 of them cached
    big = Request("big", prompt + list(range(50, 66)), SamplingParams(max_tokens=1))  # 28 tokens: 7 blocks
    sched.add_request(big)
    sched.schedule()  # 3 prefix hits, then 4 more blocks needed with 1 free: it must wait holding nothing
    assert big.status == RequestStatus.WAITING and not bm.block_table("big") and bm.num_free_blocks == 4
    bm.free("holder")
    out = sched.schedule()
    assert big.status == RequestStatus.PREFILLING and big.num_cached_tokens == 12
    assert out.prefill_batch.work[0].start_pos == 12


def test_async_scheduling_runs_one_step_ahead_and_reads_inputs_from_the_device():
    """With async scheduling a decode row of step N+1 is enqueued before step N is read back: its input is a
    placeholder the runner replaces with step N's sample; tokens and finish reasons equal the sync engine's."""
    results = {}
    for async_scheduling in (False, True):
        e = Engine(async_scheduling=async_scheduling)
        reqs = [e.add(prompt_len=6 + i, max_tokens=5 + i, ignore_eos=True) for i in range(4)]
        e.drain()
        results[async_scheduling] = [(r.output_token_ids, e.finished[r.request_id]) for r in reqs]
        if async_scheduling:
            ahead = [w for step in e.runner.steps for w in step if len(w.token_ids) == 1 and w.token_ids == [0]]
            assert ahead, "no decode row ran a step ahead"
        assert e.blocks.num_free_blocks == e.blocks.num_blocks
    assert results[True] == results[False]


class Lanes(StaticPlacement):
    """A placement of the given lanes in turn, then the prefill worker's (a policy is any object with place and the
    observe_* methods)."""

    def __init__(self, lanes):
        super().__init__(PREFILL)
        object.__setattr__(self, "lanes", list(lanes))

    def place(self, load):
        return Placement(self.lanes.pop(0) if self.lanes else PREFILL)


def test_a_prefilling_request_preempted_to_make_room_is_not_scheduled_in_the_same_batch():
    """Two prompts part-way through prefill (a placement that alternates lanes): growing the older one
    preempts the newer one, which must not then be chunked (or preempt the older one back) in the same batch."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64), bm,
                      placement=Lanes([PREFILL, DECODE]))
    sched.set_token_budget(8)
    with pytest.raises(ValueError, match=r"integer in \[1, 16\].*got 17"):
        sched.set_token_budget(17)  # past what the workers' graphs hold
    a = Request("a", list(range(1, 17)), SamplingParams(max_tokens=1))
    b = Request("b", list(range(20, 36)), SamplingParams(max_tokens=1))
    sched.add_request(a)
    sched.add_request(b)
    for out in (sched.schedule(), sched.schedule()):  # a's first chunk on one lane, b's on the other
        sched.update_from_output(PrefillDone(out.prefill_batch.batch_id, [], 0.0, 1.0))
    bm.allocate("holder", 12)  # 1 block left: a's next chunk needs 2, so b (the newest) is preempted
    sched.set_token_budget(16)
    batch = sched.schedule().prefill_batch
    assert b.status == RequestStatus.WAITING and not bm.block_table("b")
    assert a.status == RequestStatus.PREFILLING and a.num_preemptions == 0
    assert [(w.request_id, w.start_pos, len(w.token_ids)) for w in batch.work] == [("a", 8, 8)]
    assert batch.work[0].block_ids == bm.block_table("a") and len(bm.block_table("a")) == 4


def test_a_prompt_logprobs_prompt_stays_on_the_lane_of_its_first_chunk():
    """Each worker process gathers a prompt's logprobs over the chunks it ran, so a prompt_logprobs prompt started on
    one lane goes on there, whatever the placement says (mode rapid sent a later chunk to the decode worker, and the
    request came back without prompt logprobs); another prompt still goes where the placement says."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=Lanes([PREFILL, DECODE, DECODE]))
    sched.add_request(Request("p", list(range(1, 21)), SamplingParams(max_tokens=1, prompt_logprobs=1)))
    lanes = []
    for _ in range(3):
        (lane, batch), = [(lane, m) for lane, m in sched.schedule().messages if isinstance(m, PrefillBatch)]
        lanes.append((lane, [(w.request_id, w.start_pos) for w in batch.work]))
        sched.update_from_output(PrefillDone(batch.batch_id, [], 0.0, 1.0))
        if len(lanes) == 1:
            sched.add_request(Request("q", list(range(30, 34)), SamplingParams(max_tokens=1)))
    assert lanes[:2] == [(PREFILL, [("p", 0)]), (PREFILL, [("p", 8)])]
    assert lanes[2] == (PREFILL, [("p", 16), ("q", 0)])  # q rides along: the placement's DECODE was overridden
    assert sched.placement_log.reasons.get("prefill: prompt logprobs: the lane of its first chunk") == 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_max_tokens_none_runs_up_to_max_model_len(async_scheduling):
    """The engine core takes max_tokens=None (up to max_model_len); the decode executor's run-ahead check too."""
    e = Engine(max_len=24, async_scheduling=async_scheduling)
    r = e.add(prompt_len=10, max_tokens=None, ignore_eos=True)
    e.drain()
    assert len(r.output_token_ids) == 14 and e.finished[r.request_id] == "length"
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


@pytest.mark.parametrize("kv_read_elsewhere", [True, False])
def test_inline_prefill_is_reported_after_its_own_step_only(kv_read_elsewhere):
    """A decode worker whose KV other processes read waits for the step that ran an inline prefill batch (its KV
    writes) before PrefillDone, and for nothing else: not for decode-only steps, and not by a stream sync that
    would also wait for the step enqueued after it. The hybrid executor (same process) does not wait at all."""
    from rapid.protocol.worker import DecodeStep, PrefillBatch, PrefillDone, SeqWork, StartDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True,
                       cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=64))
    runner, waited = FakeRunner(), []
    runner.wait = waited.append  # launched steps (FakeRunner's are their sampled rows)
    loop = DecodeLoop(runner, cfg, (0,), kv_read_elsewhere=kv_read_elsewhere)
    loop.handle(StartDecode("d", [1, 2, 3], [4], [0, 1], SamplingParams(max_tokens=50)))
    loop.step()  # a decode-only step, enqueued ahead
    loop.handle(PrefillBatch(7, [SeqWork("p", [9, 9, 9], 0, [2], True, SamplingParams(max_tokens=5))]))
    outs = loop.step() + loop.step()  # the mixed step is launched, then read back behind the next one
    done = [o for o in outs if isinstance(o, PrefillDone)]
    assert [d.batch_id for d in done] == [7] and any(isinstance(o, DecodeStep) for o in outs)
    mixed = [w.request_id for w in runner.steps[1]]
    assert mixed == ["d", "p"]  # the decode row first, then the chunk
    if kv_read_elsewhere:
        assert len(waited) == 1 and [t.request_id for t in waited[0]] == ["d", "p"]  # that step, not the next
    else:
        assert waited == []


def test_inline_batches_queued_together_share_a_step():
    """Three inline batches queued within one step (a worker process: the core sends one as prompts arrive): p's
    and q's run in one step, within their budget, each answered with its own sampled token and the step's interval;
    the first answer carries the step's prompt tokens, so the step is learned once. p's next chunk waits for the
    step after (a prompt's chunks run in order), and a batch over the budget with the decodes waits too."""
    from rapid.protocol.worker import PrefillBatch, PrefillDone, SeqWork, StartDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True,
                       cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=64))
    runner = FakeRunner()
    runner.wait = lambda launched: None
    loop = DecodeLoop(runner, cfg, (0,), kv_read_elsewhere=True)
    loop.handle(StartDecode("d", [1, 2, 3], [4], [0, 1], SamplingParams(max_tokens=50)))
    params = SamplingParams(max_tokens=5)
    loop.handle(PrefillBatch(1, [SeqWork("p", [9] * 4, 0, [2], False, params)], max_step_tokens=16))
    loop.handle(PrefillBatch(2, [SeqWork("q", [8] * 3, 0, [3], True, params)], max_step_tokens=16))
    loop.handle(PrefillBatch(3, [SeqWork("p", [9] * 2, 4, [2, 4], True, params)], max_step_tokens=16))
    loop.handle(PrefillBatch(4, [SeqWork("r", [7] * 14, 0, [5, 6, 7, 8], True, params)], max_step_tokens=16))
    outs = [o for _ in range(5) for o in loop.step()]
    assert [[(w.request_id, len(w.token_ids)) for w in step] for step in runner.steps[:3]] == [
        [("d", 1), ("p", 4), ("q", 3)], [("d", 1), ("p", 2)], [("d", 1), ("r", 14)]]
    done = [o for o in outs if isinstance(o, PrefillDone)]
    assert [(d.batch_id, [t.request_id for t in d.sampled], d.num_tokens, d.step_tokens) for d in done] == [
        (1, [], 4, 7), (2, ["q"], 3, 0), (3, ["p"], 2, None), (4, ["r"], 14, None)]
    assert (done[0].t_start, done[0].t_end) == (done[1].t_start, done[1].t_end)
    # without a budget (0: a batch the core planned alone) nothing shares its step
    loop.handle(PrefillBatch(5, [SeqWork("s", [6] * 2, 0, [9], True, params)]))
    loop.handle(PrefillBatch(6, [SeqWork("t", [6] * 2, 0, [10], True, params)], max_step_tokens=16))
    before = len(runner.steps)
    for _ in range(3):
        loop.step()
    assert [[w.request_id for w in step if w.request_id != "d"] for step in runner.steps[before:]] == [["s"], ["t"]]


@pytest.mark.parametrize("bounds_step", [True, False])
def test_a_batch_the_placement_sized_shares_a_step_only_within_that_size(bounds_step):
    """A placement that sizes its decode-lane steps (the adaptive policy's TPOT-checked chunks and its small
    samples: bounds_step) plans the step at that size: each batch carries it (decodes included), so batches of 8
    planned beside one decode never run as one step of 16 (review of session 24). A budget that only says how much
    to take now (the adaptive policy's "cheaper for the decodes": what is queued) leaves the step at the core's
    budget, so the two share one step (since 6055025 they never did: session 25 on the H200, 1,191 batches in 1,191
    mixed steps at 44 req/s against 1,145 in 995 before)."""
    from rapid.protocol.worker import StartDecode

    class EightAtATime(StaticPlacement):
        def place(self, load):
            return Placement(DECODE, 8, "mixed step: sized", bounds_step=bounds_step)

    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(64, 4, enable_prefix_caching=False), placement=EightAtATime(DECODE))
    sched.add_request(Request("z", [1, 2, 3], SamplingParams(max_tokens=20), (0,)))
    first = [m for _, m in sched.schedule().messages if isinstance(m, PrefillBatch)][0]
    sched.update_from_output(PrefillDone(first.batch_id, [SampledToken("z", 5, 0.0)], 1.0, 1.01, num_tokens=3))
    assert sched.num_decoding == 1  # the step planned: 8 prompt tokens and z's row
    sent = []
    for rid in "ab":
        sched.add_request(Request(rid, list(range(1, 9)), SamplingParams(max_tokens=3), (0,)))
        sent += [m for _, m in sched.schedule().messages if isinstance(m, PrefillBatch)]
    assert [m.max_step_tokens for m in sent] == ([9, 9] if bounds_step else [64, 64])
    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True, cache=CacheConfig(block_size=4),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64))
    runner = FakeRunner()
    runner.wait = lambda launched: None
    loop = DecodeLoop(runner, cfg, (0,), kv_read_elsewhere=True)
    loop.handle(StartDecode("d", [1, 2, 3], [4], [40, 41], SamplingParams(max_tokens=50)))
    for m in sent:
        loop.handle(m)
    for _ in range(3):
        loop.step()
    shared = [[w.request_id for w in step if w.request_id != "d"] for step in runner.steps[:2]]
    assert shared == ([["a"], ["b"]] if bounds_step else [["a", "b"], []])


def test_a_step_of_several_inline_batches_is_learned_once():
    """The scheduler learns a mixed step's prompt cost from the answer that carries the step's tokens (all its
    batches'), not once per batch with the step's whole time."""
    from rapid.core.placement import StaticPlacement

    class Spy(StaticPlacement):
        def observe_prefill(self, lane, tokens, seconds, num_decoding=0, beside_prefill=False):
            seen.append((lane, tokens, seconds))

    seen = []
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=Spy(DECODE))
    for rid in ("a", "b"):
        sched.add_request(Request(rid, list(range(1, 9)), SamplingParams(max_tokens=3), (0,)))
        sched.schedule()
    first, second = sorted(sched.in_flight.by_lane[DECODE], key=lambda b: b.batch_id)
    sched.update_from_output(PrefillDone(first.batch_id, [], 1.0, 1.02, num_tokens=8, step_tokens=16))
    sched.update_from_output(PrefillDone(second.batch_id, [], 1.0, 1.02, num_tokens=8, step_tokens=0))
    assert seen == [(DECODE, 16, pytest.approx(0.02))]


def test_a_third_prompt_is_sent_while_one_batch_runs_and_one_waits():
    """Across processes a batch is in flight from the send to its answer, which comes after the decode worker has
    launched its next step: prompts arriving one after another are each sent, up to DECODE_LANE_DEPTH (three) on
    the decode executor, so the two waiting may share its next step; a fourth waits in the core."""
    from rapid.core.in_flight import DECODE_LANE_DEPTH
    from rapid.core.placement import StaticPlacement

    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=StaticPlacement(DECODE))
    sent = []
    for rid in "abcd":
        sched.add_request(Request(rid, list(range(1, 9)), SamplingParams(max_tokens=3), (0,)))
        sent.append([m for _, m in sched.schedule().messages if isinstance(m, PrefillBatch)])
    assert DECODE_LANE_DEPTH == 3
    assert [[w.request_id for m in batches for w in m.work] for batches in sent] == [["a"], ["b"], ["c"], []]
    assert [m.max_step_tokens for batches in sent for m in batches] == [64] * 3  # each may share a step
    first = min(sched.in_flight.by_lane[DECODE], key=lambda b: b.batch_id)
    sched.update_from_output(PrefillDone(first.batch_id, [], 1.0, 1.02, num_tokens=8))
    assert [w.request_id for _, m in sched.schedule().messages if isinstance(m, PrefillBatch) for w in m.work] == ["d"]


def test_a_timed_inline_step_is_learned_as_one_with_nothing_decoding():
    """A step of prompt tokens alone, answered while a request handed off meanwhile counts as decoding in the core:
    its device time says it ran no decode rows, so the placement learns it as a step with nothing decoding."""
    from rapid.core.placement import StaticPlacement
    from rapid.protocol.worker import DeviceTime

    class Spy(StaticPlacement):
        def observe_prefill(self, lane, tokens, seconds, num_decoding=0, beside_prefill=False):
            seen.append(num_decoding)

    seen = []
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=Spy(DECODE))
    sched.add_request(Request("a", list(range(1, 9)), SamplingParams(max_tokens=3), (0,)))
    batch = sched.schedule().prefill_batch
    handed_off = Request("b", [1, 2], SamplingParams(max_tokens=3), (0,))
    handed_off.status = RequestStatus.DECODING  # (handed off since, as the core counts it)
    sched.running.append(handed_off)
    assert sched.num_decoding == 1
    sched.update_from_output(PrefillDone(batch.batch_id, [], 1.0, 1.02, num_tokens=8,
                                         device=DeviceTime("inline", 0.02, 0.0)))
    assert seen == [0]


@pytest.mark.parametrize("case", ["a chunk alone, sampling nothing", "a decode row that cannot run ahead"])
def test_every_inline_prefill_waits_for_its_step(case):
    """The other paths to PrefillDone wait too: a prompt's non-final chunk alone (no row samples, so reading the
    step back waited for nothing), and a step read back before the next is launched (penalties need the host)."""
    from rapid.protocol.worker import PrefillBatch, PrefillDone, SeqWork, StartDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True,
                       cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=64))
    runner, waited = FakeRunner(), []
    runner.wait = waited.append
    loop = DecodeLoop(runner, cfg, (0,), kv_read_elsewhere=True)
    if case != "a chunk alone, sampling nothing":
        loop.handle(StartDecode("d", [1, 2, 3], [4], [0, 1], SamplingParams(max_tokens=50, repetition_penalty=1.2)))
    last = case != "a chunk alone, sampling nothing"  # the chunk alone is not the prompt's last
    loop.handle(PrefillBatch(3, [SeqWork("p", [9, 9, 9], 0, [2], last, SamplingParams(max_tokens=5))]))
    outs = loop.step() + loop.step()
    assert [o.batch_id for o in outs if isinstance(o, PrefillDone)] == [3]
    assert len(waited) == 1


def test_after_idle_marks_the_first_step_after_nothing_was_resident():
    """DecodeStep.after_idle: the first step after start or after the executor had nothing resident (its device wait
    is no overhead), not the steps behind it (async: launched before the first is read back), and not a step after
    a wait for blocks (requests resident)."""
    from rapid.protocol.worker import DecodeStep, GrantBlocks, StartDecode, StopDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True,
                       cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=64))
    loop = DecodeLoop(FakeRunner(), cfg, (0,))

    def steps(n):
        return [o.after_idle for _ in range(n) for o in loop.step() if isinstance(o, DecodeStep)]

    loop.handle(StartDecode("a", [1, 2, 3], [4], [0], SamplingParams(max_tokens=50)))  # one block: 4 tokens
    assert steps(3) == [True]  # the first step, then one ahead, then it waits for a block
    assert not loop.has_work()
    loop.note_no_work()  # resident, waiting for a block: not a dry spell
    loop.handle(GrantBlocks("a", [1, 2]))
    assert steps(3) == [False, False]
    loop.handle(StopDecode(["a"]))
    while loop.has_work():
        loop.step()
    loop.note_no_work()  # nothing resident now
    loop.handle(StartDecode("b", [1, 2, 3], [4], [3, 4], SamplingParams(max_tokens=50)))
    assert steps(3) == [True, False]


def test_the_decode_executor_holds_the_next_chunk_while_one_computes():
    """With async scheduling a step is launched before the one before it is read back: the core places the next
    mixed step's chunk while a chunk still computes (DECODE_LANE_DEPTH, three: one running and two that may share
    the next step), so every step carries prompt tokens while prompts wait (with one batch at a time, every other
    step carried none)."""
    from rapid.core.in_flight import DECODE_LANE_DEPTH

    assert DECODE_LANE_DEPTH == 3
    for async_scheduling in (False, True):
        e = Engine(async_scheduling=async_scheduling, budget=8)
        a = e.add(prompt_len=4, max_tokens=40, ignore_eos=True)
        e.forward()
        e.forward()  # a decoding
        b, c = e.add(tokens=list(range(50, 70)), max_tokens=3), e.add(tokens=list(range(150, 170)), max_tokens=3)
        prompt_tokens = []
        while b.num_computed_tokens < 20 or c.num_computed_tokens < 20:
            work = e.forward()
            assert sum(n for _, n in work) <= 8  # the budget covers decodes and chunks
            prompt_tokens.append(sum(n for _, n in work if n > 1))  # decode rows have one token; chunks here 6-7
        assert all(prompt_tokens[:-1]), prompt_tokens  # no step without a chunk while prompts wait
        e.drain()
        assert [len(r.output_token_ids) for r in (a, b, c)] == [40, 3, 3]


def test_a_prompts_next_chunk_follows_the_one_in_flight_on_the_decode_executor():
    """The decode executor runs its batches in order: a long prompt's next chunk is sent while the one before it
    computes, so with async scheduling every step carries one of its chunks (waiting for each chunk's answer left a
    step without prompt tokens at every chunk boundary). Its chunks start where the one ahead ends."""
    e = Engine(async_scheduling=True, budget=8)
    a = e.add(prompt_len=4, max_tokens=40, ignore_eos=True)
    e.forward()
    e.forward()  # a decoding
    b = e.add(tokens=list(range(50, 90)), max_tokens=3)  # 40 prompt tokens: six or seven chunks
    starts, sizes = [], []
    while b.num_computed_tokens < 40:
        work = e.forward()
        sizes.append(sum(n for _, n in work if n > 1))
        starts += [w.start_pos for w in e.runner.steps[-1] if w.request_id == b.request_id]
    assert all(sizes[:-1]), sizes  # no step without a chunk of b until its prompt is done
    assert starts == [7 * i for i in range(len(starts))] and 7 * len(starts) >= 40  # each where the one before ends
    e.drain()
    assert [len(r.output_token_ids) for r in (a, b)] == [40, 3]
    assert e.blocks.num_free_blocks == e.blocks.num_blocks


def test_a_prompts_chunks_do_not_chain_across_lanes():
    """A chunk in flight on a prefill worker: the prompt's next chunk waits for its answer (the lanes run apart)."""
    from rapid.core.in_flight import InFlight, InFlightBatches
    from rapid.core.placement import DECODE, PREFILL

    req = Request("r", list(range(30)), SamplingParams(max_tokens=2), (0,))
    batches = InFlightBatches()
    batches.add(PREFILL, InFlight(0, [(req, 8)]))
    assert not batches.can_take("r", DECODE) and not batches.can_take("r", PREFILL)
    batches.pop(0)
    batches.add(DECODE, InFlight(1, [(req, 8)]))
    batches.add(DECODE, InFlight(2, [(req, 6)]))
    assert batches.can_take("r", DECODE) and not batches.can_take("r", PREFILL) and batches.tokens_ahead("r") == 14
    batches.pop(1)
    assert batches.tokens_ahead("r") == 6 and "r" in batches
    batches.pop(2)
    assert "r" not in batches and batches.can_take("r", PREFILL)


def test_the_load_says_what_a_prefill_worker_could_take():
    """A prompt's rest behind its chunk in flight on the decode executor is queued for that executor only."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=Lanes([DECODE, DECODE]))
    sched.set_token_budget(8)
    a = Request("a", list(range(1, 21)), SamplingParams(max_tokens=1), (0,))
    sched.add_request(a)
    sched.schedule()  # a[0:8] on the decode executor
    assert (sched.load().queued_tokens, sched.load().prefill_queued_tokens) == (12, 0)
    sched.add_request(Request("b", list(range(30, 35)), SamplingParams(max_tokens=1), (0,)))
    assert (sched.load().queued_tokens, sched.load().prefill_queued_tokens) == (17, 5)
    # no waiting prompt counts while none can be admitted (max_num_seqs reached: session 23's review)
    sched.config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=16, max_model_len=64)
    assert (sched.load().queued_tokens, sched.load().prefill_queued_tokens) == (17, 0)


def test_a_chained_chunk_never_preempts_a_request_of_its_batch():
    """a's first chunk on the prefill worker, b's on the decode executor; a answered, two blocks left. The next
    decode batch takes a's second chunk, then b's (chained behind its first): with no block left, b's chunk waits
    for its answer. (Growing it by preemption chose a, the newest request not in flight, already in this batch:
    the worker got a chunk of a request without blocks, session 22's review.)"""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64), bm,
                      placement=Lanes([PREFILL, DECODE, DECODE]))
    sched.set_token_budget(8)
    a = Request("a", list(range(1, 17)), SamplingParams(max_tokens=1), (0,))
    b = Request("b", list(range(20, 36)), SamplingParams(max_tokens=1), (0,))
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule().prefill_batch  # a[0:8] on the prefill worker
    sched.schedule()  # b[0:8] on the decode executor
    sched.update_from_output(PrefillDone(first.batch_id, [], 0.0, 1.0))
    bm.allocate("holder", 8)  # two blocks free
    sched.set_token_budget(16)
    batch = sched.schedule().prefill_batch
    assert [(w.request_id, w.start_pos, len(w.token_ids)) for w in batch.work] == [("a", 8, 8)]
    assert a.status == b.status == RequestStatus.PREFILLING and a.num_preemptions == b.num_preemptions == 0
    for w in batch.work:
        assert len(w.block_ids) * 4 >= w.start_pos + len(w.token_ids)


def test_a_prompt_that_preempts_itself_starts_again_at_its_first_token():
    """Half of a's prompt computed, one block free: growing it preempts a itself (the newest), and the same batch
    admits it again from token 0, as the core records it (the chunk's start was once kept from before)."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64), bm,
                      placement=StaticPlacement(DECODE))
    a = Request("a", list(range(1, 17)), SamplingParams(max_tokens=1), (0,))
    sched.add_request(a)
    sched.update_from_output(PrefillDone(sched.schedule().prefill_batch.batch_id, [], 0.0, 1.0))
    bm.allocate("holder", 20)  # one block free: a's next chunk needs two
    w = sched.schedule().prefill_batch.work[0]
    assert a.num_preemptions == 1 and a.num_computed_tokens == 0
    assert (w.start_pos, w.token_ids, w.sample) == (0, list(range(1, 9)), False)
    assert len(w.block_ids) * 4 >= len(w.token_ids)


def test_rows_handed_off_after_a_chunk_was_budgeted_wait_a_step():
    """The core budgets a chunk against the decodes it knew of; requests handed off from the prefill worker before
    the chunk's step launches wait a step rather than make it larger than the step budget (the largest graph)."""
    from rapid.protocol.worker import PrefillBatch, SeqWork, StartDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", async_scheduling=True, cache=CacheConfig(block_size=4),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64))
    runner = FakeRunner()
    loop = DecodeLoop(runner, cfg, (0,))
    loop.handle(PrefillBatch(1, [SeqWork("p", list(range(6)), 0, [0, 1], True, SamplingParams(max_tokens=5))]))
    for i in range(4):  # handed off after the chunk was budgeted for no decodes... and two more than room
        loop.handle(StartDecode(f"d{i}", [1, 2, 3], [4], [2 + 2 * i, 3 + 2 * i], SamplingParams(max_tokens=50)))
    loop.step()
    assert [(w.request_id, len(w.token_ids)) for w in runner.steps[0]] == [("d0", 1), ("d1", 1), ("p", 6)]
    loop.step()
    assert [w.request_id for w in runner.steps[1]] == ["d0", "d1", "d2", "d3"]  # the next step: every row


class QueuedWorkers:
    """The decode executor as rapid's decode worker process runs it: the core's messages wait in its inbox, and it
    steps only on some polls, so the core may send a second prefill batch before the first was launched."""

    def __init__(self, loop, rng, runner=None, idle_polls=0.5):
        """`runner`: given, a prefill worker too, which answers its batches on some polls (recorded there).
        `idle_polls`: the share of polls on which nothing happens (more: more batches queue, and share a step)."""
        self.loop, self.rng, self.inbox, self.runner, self.prefill = loop, rng, [], runner, []
        self.idle_polls, self.sent, self.answered = idle_polls, [], []  # batch ids sent and answered, in order
        self.joined = 0  # batches that ran in a step with another before them

    def send(self, lane, msg):
        (self.prefill if lane == PREFILL else self.inbox).append(msg)
        self.sent += [msg.batch_id] if isinstance(msg, PrefillBatch) else []

    def poll(self):
        out = self._poll()
        self.answered += [m.batch_id for m in out if isinstance(m, PrefillDone)]
        self.joined += sum(1 for m in out if isinstance(m, PrefillDone) and m.step_tokens == 0)  # shared a step
        return out

    def _poll(self):
        if self.rng.random() < self.idle_polls:
            return []
        if self.prefill and self.rng.random() < 0.3:
            batch = self.prefill.pop(0)
            sampled = self.runner.launch(batch.work)
            tokens = sum(len(w.token_ids) for w in batch.work)
            return [PrefillDone(batch.batch_id, sampled, 0.0, 1.0, num_tokens=tokens)]
        out = [d for m in self.inbox if (d := self.loop.handle(m)) is not None]
        self.inbox = []
        if self.loop.has_work():
            return out + self.loop.step()
        self.loop.note_no_work()
        return out


class RandomLanes(StaticPlacement):
    """Each prefill batch to the decode executor or the prefill worker, at random."""

    def __init__(self, rng):
        super().__init__(PREFILL)
        object.__setattr__(self, "rng", rng)

    def place(self, load):
        return Placement(self.rng.choice((DECODE, PREFILL)))


@pytest.mark.parametrize("mode", ["hybrid", "rapid"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 17, 49, 50, 65, 73])  # 17-73 caught faults of the first chained chunks
def test_two_chunks_queued_on_the_decode_executor_keep_every_prompt_in_order(seed, mode):
    """Random arrivals, aborts and preemptions, with two batches waiting unlaunched at times, sharing a step when
    they fit (and in rapid, batches on a prefill worker at random): each prompt's chunks run in order and once, each with blocks for its tokens, no
    step exceeds the budget, and every request ends with its blocks freed."""
    import random

    from rapid.core.in_flight import DECODE_LANE_DEPTH

    rng = random.Random(seed)
    cfg = EngineConfig(model="m", tokenizer=None, mode=mode, async_scheduling=True,
                       cache=CacheConfig(block_size=4, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=12, max_model_len=128),
                       rapid=RapidConfig(decode_lookahead_blocks=1))
    runner = FakeRunner()
    workers = QueuedWorkers(DecodeLoop(runner, cfg, (0,)), rng, runner if mode == "rapid" else None)
    core = EngineCore(cfg, None, (0,), workers, 40)
    if mode == "rapid":
        core.scheduler.placement = RandomLanes(rng)
    sched, prompts, next_start, deepest, added = core.scheduler, {}, {}, 0, 0
    for _ in range(5000):
        if added < 30 and rng.random() < 0.15:
            rid, prompt = f"q{added}", list(range(100 * added, 100 * added + rng.randint(3, 40)))
            core.add_request(AddRequest(rid, prompt, SamplingParams(max_tokens=rng.randint(1, 20))))
            prompts[rid], added = prompt, added + 1
        if sched.requests and rng.random() < 0.02:
            core.abort([rng.choice(sorted(sched.requests))])
        ran = len(runner.steps)
        core.step()
        deepest = max(deepest, len(sched.in_flight.by_lane.get(DECODE, ())))
        for step in runner.steps[ran:]:
            assert sum(len(w.token_ids) for w in step) <= 12
            assert len({w.request_id for w in step}) == len(step)  # a request once a step
            for w in step:
                assert len(w.block_ids) * 4 >= w.start_pos + len(w.token_ids)  # blocks for every token it writes
                if w.start_pos < len(prompts[w.request_id]):  # decode rows start past the prompt
                    # a prompt chunk: where the last one ended (or from the start again, after a preemption)
                    assert w.start_pos in (0, next_start.get(w.request_id)), (w.request_id, w.start_pos)
                    next_start[w.request_id] = w.start_pos + len(w.token_ids)
        if added == 30 and not sched.has_unfinished():
            break
    assert deepest == DECODE_LANE_DEPTH and not sched.has_unfinished()  # (three: a step may take two)
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


@pytest.mark.parametrize("seed", range(6))
def test_inline_batches_that_share_steps_each_run_once_in_order(seed):
    """A decode worker that steps on few polls, short prompts, prefix caching on: queued inline batches often share
    a step, two or three at a time. Each batch is answered exactly once, each prompt's chunks run in order within
    the step budget, and every block is freed (the review of session 24 ran this over 40 seeds)."""
    import random

    rng = random.Random(seed)
    cfg = EngineConfig(model="m", tokenizer=None, mode="hybrid", async_scheduling=True,
                       cache=CacheConfig(block_size=4, enable_prefix_caching=True),
                       scheduler=SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=48, max_model_len=128))
    runner = FakeRunner()
    workers = QueuedWorkers(DecodeLoop(runner, cfg, (0,)), rng, idle_polls=0.7)
    core = EngineCore(cfg, None, (0,), workers, 128)  # room for all: no preemption (a chunk would start again)
    sched, prompts, next_start = core.scheduler, {}, {}
    shared_prefix = list(range(1000, 1016))
    for i in range(40):
        prompt = shared_prefix[: rng.choice((0, 8, 16))] + list(range(100 * i, 100 * i + rng.randint(1, 6)))
        prompts[f"q{i}"] = prompt
        core.add_request(AddRequest(f"q{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 8))))
        for _ in range(rng.randint(1, 3)):  # each arrival its own batch
            ran = len(runner.steps)
            core.step()
            for step in runner.steps[ran:]:
                assert sum(len(w.token_ids) for w in step) <= 48
                for w in step:
                    if w.start_pos < len(prompts[w.request_id]) and w.request_id in next_start:
                        assert w.start_pos == next_start[w.request_id], w.request_id  # after the chunk before
                    next_start[w.request_id] = w.start_pos + len(w.token_ids)
    while sched.has_unfinished():
        core.step()
    assert sorted(workers.answered) == sorted(workers.sent) == sorted(set(workers.sent))  # once each
    assert workers.joined >= 3, workers.joined  # batches queued together shared steps
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def _async_loop_with_one_request(runner) -> DecodeLoop:
    """A hybrid decode executor one step ahead (async scheduling) over `runner`, one request decoding."""
    from rapid.protocol.worker import StartDecode

    cfg = EngineConfig(model="m", tokenizer=None, mode="hybrid", async_scheduling=True,
                       cache=CacheConfig(block_size=4), scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=64))
    loop = DecodeLoop(runner, cfg, (0,))
    loop.handle(StartDecode("d", [1, 2, 3], [4], [0, 1, 2, 3], SamplingParams(max_tokens=50)))
    return loop


def test_a_step_launched_ahead_is_timed_from_the_step_in_front_of_it(monkeypatch):
    """A step enqueued while the one before it runs cannot start before that one ends: its reported interval (what
    the placement learns a step's and a prompt token's cost from) starts at the read-back of the step in front, not
    at its own launch (which would count most of the step before twice)."""
    import types

    import rapid.worker.decode_loop as decode_loop
    from rapid.protocol.worker import DecodeStep, PrefillBatch, PrefillDone, SeqWork

    clock = [0.0]
    monkeypatch.setattr(decode_loop, "time", types.SimpleNamespace(time=lambda: clock[0]))

    class DeviceRunner(FakeRunner):
        """A device running its steps one after another: 10 ms a step, 20 with a prompt chunk."""

        free_at = 0.0

        def launch(self, work, inputs_from=None):
            self.free_at = max(clock[0], self.free_at) + (0.020 if any(len(w.token_ids) > 1 for w in work) else 0.010)
            return self.free_at, super().launch(work, inputs_from)

        def collect(self, launched):
            clock[0] = max(clock[0], launched[0])  # the host waits for the step
            return launched[1]

    loop = _async_loop_with_one_request(DeviceRunner())
    outs = []
    for i in range(8):
        if i in (3, 4):  # two chunks queued back to back: mixed steps one behind the other
            loop.handle(PrefillBatch(i, [SeqWork(f"p{i}", [9] * 6, 0, [4 + i], True, SamplingParams(max_tokens=5))]))
        outs += loop.step()
        clock[0] += 0.001  # the host's work between steps
    steps = [(round((o.t_end - o.t_start) * 1e3, 3), o.__class__.__name__) for o in outs
             if isinstance(o, (DecodeStep, PrefillDone))]
    assert steps[1:] == [(10.0, "DecodeStep")] * 2 + [(20.0, "DecodeStep"), (20.0, "PrefillDone")] * 2 + [
        (10.0, "DecodeStep")] * 2, steps


def test_a_timed_step_reports_the_devices_interval_when_the_host_reads_back_late(monkeypatch):
    """With device times (CUDA events on a GPU) a step's interval is the device's: its busy time and the stream's
    wait for the host before it. A read-back that lags a step's end would otherwise shorten the next step's host
    interval; a pause with nothing to run is no part of the next step."""
    import types

    import rapid.worker.decode_loop as decode_loop
    from rapid.protocol.worker import DecodeStep

    clock = [0.0]
    monkeypatch.setattr(decode_loop, "time", types.SimpleNamespace(time=lambda: clock[0]))

    class LateHostRunner(FakeRunner):
        """10 ms steps back to back on the device; the host reads every other step back 6 ms late."""

        free_at, reads = 0.0, 0

        def launch(self, work, inputs_from=None):
            start = max(clock[0], self.free_at)
            idle, self.free_at = start - self.free_at if self.free_at else 0.0, start + 0.010
            return types.SimpleNamespace(end=self.free_at, busy=0.010, idle=idle, eager=False,
                                         sampled=super().launch(work, inputs_from))

        def collect(self, launched):
            self.reads += 1
            clock[0] = max(clock[0], launched.end) + (0.006 if self.reads % 2 else 0.0)
            return launched.sampled

        def device_time(self, launched):
            return launched.busy, launched.idle

    loop = _async_loop_with_one_request(LateHostRunner())
    outs = []
    for _ in range(8):
        outs += loop.step()
    steps = [o for o in outs if isinstance(o, DecodeStep)]
    assert len(steps) >= 6
    # each step: 10 ms on the device, plus the stream's wait where the late host launched the next step late
    assert all(round((s.t_end - s.t_start) * 1e3, 3) == round((s.device.busy_s + s.device.idle_s) * 1e3, 3)
               for s in steps[1:]), [(s.t_end - s.t_start, s.device) for s in steps]
    assert all(9.999 <= (s.t_end - s.t_start) * 1e3 for s in steps[1:]), [(s.t_end - s.t_start) for s in steps]
    # a pause with nothing to run (the request waiting for blocks: still resident) is no part of the next step
    loop.note_no_work()
    clock[0] += 0.5
    after = [o for _ in range(3) for o in loop.step() if isinstance(o, DecodeStep)]
    assert any(s.device.idle_s > 0.4 and not s.after_idle for s in after), after  # the device waited 0.5 s
    assert all((s.t_end - s.t_start) * 1e3 < 20 for s in after), [(s.t_end - s.t_start, s.device) for s in after]


def test_decode_steps_are_learned_beside_a_prefill_batch_by_when_they_ran():
    """A decode step that ran beside a prefill worker's batch is learned as beside it even when it is read after
    the batch's answer (as one that ends after the batch often is); one that ran before the batch was sent, or after
    it ended, as alone, whatever is in flight when it is read."""
    import time

    from rapid.core.placement import DECODE, PREFILL, Placement, StaticPlacement
    from rapid.protocol.worker import DecodeStep, PrefillDone

    class Recording(StaticPlacement):
        def __init__(self):
            super().__init__(PREFILL)
            object.__setattr__(self, "steps", [])

        def observe_decode_step(self, step_ms, beside_prefill=False, mixed=False):
            self.steps.append((round(step_ms, 3), beside_prefill))

        def observe_prefill(self, lane, tokens, seconds, num_decoding=0, beside_prefill=False):
            self.prefills.append((lane, beside_prefill))

        def place(self, load):
            return Placement(self.lanes.pop(0))

    policy = Recording()
    object.__setattr__(policy, "prefills", [])
    object.__setattr__(policy, "lanes", [PREFILL, DECODE, DECODE])
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64),
                      BlockManager(32, 4, enable_prefix_caching=False), placement=policy)
    for rid in "abc":
        sched.add_request(Request(rid, list(range(1, 9)), SamplingParams(max_tokens=1)))
    t = time.time()  # the batch is sent at about t
    batch = sched.schedule().prefill_batch
    mixed, mixed_after = sched.schedule().prefill_batch, sched.schedule().prefill_batch  # two on the decode lane

    def step(start_ms, end_ms):
        sched.update_from_output(DecodeStep([SampledToken("gone", 7, 0.0)], [], t + start_ms / 1e3, t + end_ms / 1e3))

    step(-12, -2)  # before the batch was sent, read while it is in flight: alone
    step(-6, 6)  # half of it after the batch was sent: beside
    sched.update_from_output(PrefillDone(batch.batch_id, [], t + 1e-3, t + 21e-3, num_tokens=8))
    step(12, 24)  # 9 of its 12 ms beside the batch, read after the batch's answer: beside
    step(20.5, 30.5)  # 0.5 of its 10 ms beside it: learned as neither
    step(32, 42)  # after the batch: alone
    assert policy.steps == [(10.0, False), (12.0, PREFILL), (12.0, PREFILL), (10.0, False)], policy.steps
    # a mixed step is learned as beside a batch the same way: by when it ran
    sched.update_from_output(PrefillDone(mixed.batch_id, [], t + 12e-3, t + 24e-3, num_tokens=8))
    sched.update_from_output(PrefillDone(mixed_after.batch_id, [], t + 32e-3, t + 42e-3, num_tokens=8))
    assert policy.prefills == [(PREFILL, False), (DECODE, PREFILL), (DECODE, False)], policy.prefills


def test_disagg_admits_a_prompt_only_when_the_decode_pool_can_take_its_kv():
    """Disagg (two pools): a prompt is admitted only while the decode pool's free blocks hold it and every prompt still
    prefilling, since each is copied there when done. Admitting past that recomputed most prompts on a small decode
    pool (344 preemptions against rapid's 10 in one CPU run, session 35)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                      BlockManager(16, 4, enable_prefix_caching=False),
                      decode_blocks=BlockManager(8, 4, enable_prefix_caching=False), placement=StaticPlacement(PREFILL))
    reqs = [Request(r, list(range(1 + 20 * i, 13 + 20 * i)), SamplingParams(max_tokens=4)) for i, r in enumerate("abc")]
    for r in reqs:
        sched.add_request(r)  # 12 tokens: 3 blocks each; the decode pool has 8
    batch = sched.schedule().prefill_batch
    assert [w.request_id for w in batch.work] == ["a", "b"]
    assert reqs[2].status == RequestStatus.WAITING and not sched.blocks.block_table("c")
    sampled = [SampledToken(r, 7, -0.1) for r in "ab"]
    sched.update_from_output(PrefillDone(batch.batch_id, sampled, 0.0, 1.0))
    assert [r.status for r in reqs[:2]] == [RequestStatus.DECODING] * 2
    assert sched.decode_blocks.num_free_blocks == 0  # a and b hold 4 each there now (their 16 tokens at most)
    assert sched.schedule().prefill_batch is None  # c needs 3: it waits instead of being prefilled and recomputed
    sched.finish(reqs[0], "abort")  # a's 4 decode blocks come back once its executor drops it
    sched.update_from_output(Dropped(["a"]))
    assert [w.request_id for w in sched.schedule().prefill_batch.work] == ["c"]
    assert sched.num_preemptions == 0 and reqs[2].num_preemptions == 0
