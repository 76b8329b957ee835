"""The run-time spatial lever on the CPU: mode 'rapid' with a second prefill worker (second_prefill_sm_percentage),
the ATOM rule that routes between the two, and the MPS share each worker is started with."""

import random

import pytest

from rapid import LLM, SamplingParams
from rapid.bench.serve import parse_configuration
from rapid.config import EngineArgs, EngineConfig, RapidConfig
from rapid.core.adaptive import make_placement
from rapid.core.placement import ATOM_MIN_DECODE_BATCH, DECODE, PREFILL, PREFILL2, AtomPlacement, Load
from rapid.engine import launch
from rapid.engine.mps import MpsDaemon, worker_env
from rapid.entrypoints.cli import build_parser
from tiny import engine_pids, gone, hf_greedy


def load(decoding: int) -> Load:
    return Load(num_decoding=decoding, queued_tokens=500, oldest_wait_s=0.0, decode_step_ms=10.0,
                prefill_lane_busy=False)


def test_atom_rule_restricts_prefill_only_beside_a_large_decode_batch():
    rule = AtomPlacement()
    assert rule.place(load(0)).lane == PREFILL
    assert rule.place(load(ATOM_MIN_DECODE_BATCH - 1)).lane == PREFILL
    assert rule.place(load(ATOM_MIN_DECODE_BATCH)).lane == PREFILL2
    assert rule.place(load(500)).lane == PREFILL2


def test_the_second_prefill_worker_is_configured_once_and_checked():
    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", rapid=RapidConfig(second_prefill_sm_percentage=40,
                                                                                  placement="atom"))
    assert launch.topology(cfg) == "rapid-2prefill" and launch.workers(cfg) == ("decode", "prefill", "prefill2")
    assert [[r.name for r in stage] for stage in launch.stages("rapid-2prefill")] == [["decode"],
                                                                                     ["prefill", "prefill2", "core"]]
    assert isinstance(make_placement(cfg), AtomPlacement)
    adaptive = make_placement(EngineConfig(model="m", tokenizer=None, mode="rapid",
                                           rapid=RapidConfig(second_prefill_sm_percentage=40)))
    assert adaptive.prefill_lanes == (PREFILL, PREFILL2)
    # each worker gets its own share in its own environment
    daemon = MpsDaemon("/tmp/pipe", None, started=False)
    shares = {role: worker_env(cfg, role, daemon).get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
              for role in ("decode", "prefill", "prefill2", "core")}
    assert shares == {"decode": "100", "prefill": "100", "prefill2": "40", "core": None}
    with pytest.raises(ValueError, match=r"second_prefill_sm_percentage must be an integer in \[1, 100\].*0"):
        RapidConfig(second_prefill_sm_percentage=0)
    with pytest.raises(ValueError, match="placement 'atom'.*second_prefill_sm_percentage"):
        RapidConfig(placement="atom")
    for never in ("static", "mixed"):
        with pytest.raises(ValueError, match=rf"second_prefill_sm_percentage \(50\) .*placement '{never}' never uses"):
            RapidConfig(placement=never, second_prefill_sm_percentage=50)
    with pytest.raises(ValueError, match=r"second_prefill_sm_percentage \(50\) and placement \('adaptive'\) need mode"):
        EngineConfig(model="m", tokenizer=None, mode="hybrid", rapid=RapidConfig(second_prefill_sm_percentage=50))
    for mode in ("hybrid", "disagg"):  # a placement names lanes of mode rapid (disagg's prompts run on its prefill GPU)
        with pytest.raises(ValueError, match=rf"placement \('mixed'\) need mode 'rapid'.*not '{mode}'"):
            EngineConfig(model="m", tokenizer=None, mode=mode, rapid=RapidConfig(placement="mixed"))
    assert parse_configuration("rapid:atom:p2=50") == ("rapid", {"placement": "atom",
                                                                "second_prefill_sm_percentage": 50})
    with pytest.raises(ValueError, match="p2=101"):
        parse_configuration("rapid:p2=101")
    args = build_parser().parse_args(["serve", "--mode", "rapid", "--second-prefill-sm-percentage", "30"])
    assert EngineArgs.from_cli_args(args).second_prefill_sm_percentage == 30


@pytest.mark.slow
def test_atom_engine_routes_beside_a_large_batch_and_matches_transformers(tiny_llama):
    """Two prefill workers map the one arena: greedy tokens equal transformers whichever prefilled them, the
    batches beside 64 or more decodes went to the second, and every process goes at shutdown."""
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(4, 12))] for _ in range(100)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    with LLM(tiny_llama, mode="rapid", placement="atom", second_prefill_sm_percentage=50, max_num_seqs=128,
             max_num_batched_tokens=64) as llm:
        pids = engine_pids(llm)
        assert set(pids) == {"decode", "prefill", "prefill2", "core"}
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stats = llm.engine.get_stats()
    assert stats.placement_policy == "atom"
    assert stats.prefill_tokens_by_lane[PREFILL] > 0 and stats.prefill_tokens_by_lane[PREFILL2] > 0, stats
    assert sum(stats.prefill_tokens_by_lane.values()) == sum(map(len, prompts))
    for i in (0, 50, 99):  # the oracle on a few (transformers is slow); the rest must at least be complete
        assert outs[i].outputs[0].token_ids == hf_greedy(tiny_llama, prompts[i], 64)
    assert all(len(o.outputs[0].token_ids) == 64 for o in outs)
    assert all(gone(pid) for pid in pids.values())


def test_adaptive_learns_each_prefill_worker_and_keeps_the_cheaper_one_in_time():
    """With two prefill workers each one's cost to the decodes is learned apart (the second is tried once the first
    is known). The restricted one slows 10 ms decode steps less (11 ms beside 300 tokens: 3.3 us a token, against
    the full share's 10 ms per 600 tokens: 17 us) and is kept; but it prefills at 12k tok/s, so when the queue would
    then miss the TTFT SLO the full-share worker (60k tok/s) takes the batch."""
    from rapid.core.adaptive import AdaptivePlacement

    p = AdaptivePlacement(8192, slo_ttft_ms=500, slo_tpot_ms=50, prefill_lanes=(PREFILL, PREFILL2))
    p.observe_decode_step(10.0)
    for _ in range(5):
        p.observe_decode_step(20.0, beside_prefill=True)
        p.observe_prefill(PREFILL, 600, 0.01, num_decoding=64)
    for _ in range(3):  # mixed steps measured: 100 us a prompt token (dearer than either prefill worker)
        p.observe_prefill(DECODE, 100, 0.020, num_decoding=64)
    small = Load(num_decoding=64, queued_tokens=300, oldest_wait_s=0.0, decode_step_ms=10.0, prefill_lane_busy=False)
    placed = p.place(small)
    assert (placed.lane, placed.reason) == (PREFILL2, "concurrent: measuring its cost beside decodes")
    for _ in range(5):
        p.observe_decode_step(11.0, beside_prefill=True)
        p.observe_prefill(PREFILL2, 300, 0.025, num_decoding=64)
    assert p.costs.decode_cost_ms_per_token(PREFILL2) < p.costs.decode_cost_ms_per_token(PREFILL)
    assert p.place(small).lane == PREFILL2
    big = Load(num_decoding=64, queued_tokens=6000, oldest_wait_s=0.1, decode_step_ms=10.0, prefill_lane_busy=False)
    assert p.place(big).lane == PREFILL  # 6,000 tokens at 12k tok/s: 600 ms, past 80% of the 500 ms SLO
    assert AdaptivePlacement(8192, prefill_lanes=(PREFILL, PREFILL2)).place(small).lane == PREFILL  # untried first


def test_one_prefill_batch_at_a_time_between_the_two_prefill_workers():
    """The two prefill workers share the prefill side: while one has a batch in flight, a placement on the other
    waits; the decode lane stays free for mixed steps."""
    import itertools

    from rapid.config import SchedulerConfig
    from rapid.core.block_manager import BlockManager
    from rapid.core.placement import Placement, ReadsNoTimings
    from rapid.core.request import Request
    from rapid.core.scheduler import Scheduler
    from rapid.params import SamplingParams
    from rapid.protocol.worker import PrefillBatch, PrefillDone

    class Alternate(ReadsNoTimings):
        name, reads_load = "alternate", False
        lanes = itertools.cycle([PREFILL, PREFILL2])

        def place(self, load):
            return Placement(next(self.lanes))

    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256),
                      BlockManager(64, 4, enable_prefix_caching=False), placement=Alternate())
    for i in range(3):
        sched.add_request(Request(f"r{i}", list(range(10 + 16 * i, 26 + 16 * i)), SamplingParams(max_tokens=4)))
    sent = [(lane, m) for lane, m in sched.schedule().messages if isinstance(m, PrefillBatch)]
    assert [lane for lane, _ in sent] == [PREFILL]
    assert not [m for _, m in sched.schedule().messages if isinstance(m, PrefillBatch)]  # prefill2 chosen: waits
    sched.update_from_output(PrefillDone(sent[0][1].batch_id, [], 0.0, 1.0, num_tokens=16))
    again = [(lane, m) for lane, m in sched.schedule().messages if isinstance(m, PrefillBatch)]
    assert len(again) == 1 and again[0][0] in (PREFILL, PREFILL2) and sched.in_flight.beside


@pytest.mark.slow
def test_rapid_serve_with_a_second_prefill_worker(tiny_llama):
    """The CLI path: `rapid serve --mode rapid --second-prefill-sm-percentage 50` starts the core, the decode worker
    and both prefill workers, serves completions, reports the lanes on /metrics, and leaves no process at SIGTERM."""
    import re
    import signal
    import subprocess
    import sys

    import httpx
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", "--model", str(tiny_llama),
                             "--mode", "rapid", "--second-prefill-sm-percentage", "50", "--max-model-len", "256",
                             "--port", "0", "--no-zmq", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"(http://\S+)/v1", proc.stdout.readline()).group(1)
        children = psutil.Process(proc.pid).children(recursive=True)
        roles = {(cmd := c.cmdline())[cmd.index("rapid.engine.child") + 1] for c in children
                 if "rapid.engine.child" in c.cmdline()}
        assert roles == {"core", "decode", "prefill", "prefill2"}, roles
        body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        out = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert out["usage"]["completion_tokens"] == 5
        metrics = httpx.get(url + "/metrics", timeout=10).text
        assert 'lane="prefill2"' in metrics and 'rapid:prefill_placed_tokens_total' in metrics
        assert "# TYPE rapid:placement_cost_us_per_prompt_token gauge" in metrics  # samples once a lane is measured
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(gone(c.pid) for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_use_mps_false_warns_when_a_running_daemon_would_take_the_workers(monkeypatch, tmp_path):
    """A CUDA process joins the MPS daemon at its pipe whatever the engine asks: use_mps=False says so when one
    runs (a 'nomps' measurement would not be one), and only the time-slicing warning when none does."""
    import warnings

    from rapid.engine import mps

    monkeypatch.setattr(mps, "uses_cuda", lambda config: True)
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    cfg = EngineConfig(model="m", tokenizer=None, mode="rapid", rapid=RapidConfig(use_mps=False))
    for running in (False, True):
        if running:
            (tmp_path / "control").touch()  # what daemon_running looks for
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert MpsDaemon.for_config(cfg) is None
        messages = [str(w.message) for w in caught]
        assert any("time-slice" in m for m in messages)
        assert any(f"an MPS daemon runs at {tmp_path}" in m for m in messages) == running, messages
