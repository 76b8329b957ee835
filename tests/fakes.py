"""An EngineCore driven by fake workers: the core's messages are recorded per lane, results are handed in."""

from rapid.config import CacheConfig, EngineConfig, RapidConfig, SchedulerConfig
from rapid.engine.core import EngineCore
from rapid.params import SamplingParams
from rapid.protocol.engine import AddRequest
from rapid.protocol.worker import PrefillBatch, PrefillDone, SampledToken


class FakeWorkers:
    """Records what the core sends per lane; `poll` hands back the results a test queued."""

    def __init__(self):
        self.prefill: list[PrefillBatch] = []
        self.decode: list = []
        self.results: list = []

    def send(self, lane, msg):
        getattr(self, lane).append(msg)

    def poll(self):
        out, self.results = self.results, []
        return out


class Harness:
    """An EngineCore and its fake workers, with one method per kind of worker result."""

    def __init__(self, core: EngineCore, workers: FakeWorkers):
        self.core, self.w = core, workers
        self.deltas = []

    def __getattr__(self, name):
        return getattr(self.core, name)

    @property
    def requests(self):
        return self.core.scheduler.requests

    @property
    def blocks(self):
        return self.core.scheduler.blocks

    def status(self, rid):
        return self.requests[rid].status

    def deliver(self, *msgs):
        self.w.results.extend(msgs)
        self.deltas += self.core.step()

    def dispatch(self):
        self.deltas += self.core.step()

    def abort(self, ids):
        self.deltas += self.core.abort(ids)

    def take_deltas(self):
        out, self.deltas = self.deltas, []
        return out


def make_core(num_blocks=32, budget=64, lookahead=1, tokenizer=None, mode="rapid", block_size=4, max_model_len=256,
              num_decode_blocks=0, placement="static", slo_ttft_ms=None, slo_tpot_ms=None):
    cfg = EngineConfig(model="m", tokenizer="t", mode=mode,
                       cache=CacheConfig(block_size=block_size),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget,
                                                 max_model_len=max_model_len),
                       rapid=RapidConfig(decode_lookahead_blocks=lookahead,
                                         placement=placement if mode == "rapid" else "adaptive",  # (rapid's only)
                                         slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms))
    w = FakeWorkers()
    return Harness(EngineCore(cfg, tokenizer, (0,), w, num_blocks, num_decode_blocks=num_decode_blocks), w), w


def add(core, rid, n_prompt=10, max_tokens=8):
    core.add_request(AddRequest(rid, list(range(1 + len(rid), n_prompt + 1 + len(rid))),
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True)))


def finish_prefill(core, w, token=7, lane="prefill"):
    batch = getattr(w, lane)[-1] if lane == "prefill" else [m for m in w.decode if isinstance(m, PrefillBatch)][-1]
    sampled = [SampledToken(x.request_id, token, -0.5) for x in batch.work if x.sample]
    core.deliver(PrefillDone(batch.batch_id, sampled, 0.0, 1.0, num_tokens=sum(len(x.token_ids) for x in batch.work)))
