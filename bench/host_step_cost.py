"""The engine's own host work per decode step, without a model: the core (scheduler, output processing; token ids
only, no detokenisation) and the decode executor (DecodeLoop) around a stand-in runner that samples at once.

This is the Python that must fit inside a device step for the GPU never to wait (async scheduling overlaps it
with the step in flight): on the H200 an 8B decode step takes 5-20 ms, a 135M model's far less. The model runner's
own input preparation (tensors, copies) is not in it. Per batch size, --repeats fresh engines, each the median of
--steps steps after --warmup (wall clock; the start-up heap frozen out of the garbage collector, as the engine's
processes run); the lowest and highest of those medians are reported. --profile prints the top functions at the
largest batch.

    python bench/host_step_cost.py --batches 1,64,256 --out bench/results/sessionNN
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from rapid.engine.core import EngineCore  # noqa: E402
from rapid.engine.inproc import InprocWorkers  # noqa: E402
from rapid.params import SamplingParams  # noqa: E402
from rapid.protocol.engine import AddRequest  # noqa: E402
from rapid.protocol.worker import SampledToken  # noqa: E402
from rapid.worker.decode_loop import DecodeLoop  # noqa: E402
from rapid.worker.gc_heap import startup_heap_frozen  # noqa: E402


class StandInRunner:
    """ModelRunner's interface, no model: every sampling row gets token 5 (never EOS) at once."""

    grammars = None

    def launch(self, work, inputs_from=None):
        return SimpleNamespace(tokens=[SampledToken(w.request_id, 5, -0.5) for w in work if w.sample], eager=False)

    def collect(self, launched):
        return launched.tokens

    def device_time(self, launched):
        return None

    def wait(self, launched):
        pass


def engine(batch: int, prompt_len: int) -> EngineCore:
    cfg = EngineConfig(model="m", tokenizer=None, mode="hybrid",
                       cache=CacheConfig(block_size=16),
                       scheduler=SchedulerConfig(max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
                                                 max_model_len=4096))
    core = EngineCore(cfg, None, (0,), InprocWorkers(DecodeLoop(StandInRunner(), cfg, (0,))), num_blocks=40_000)
    for i in range(batch):
        core.add_request(AddRequest(f"r{i}", [(7 * i + j) % 1000 + 1 for j in range(prompt_len)],
                                    SamplingParams(max_tokens=4096 - prompt_len, ignore_eos=True)))
    return core


def step_times_ms(core: EngineCore, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        core.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        core.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40)  # past the prompts' chunks (32 at batch 256): decode steps
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        medians = []
        for _ in range(args.repeats):
            core = engine(b, args.prompt_len)
            with startup_heap_frozen("host-step-cost"):
                medians.append(statistics.median(step_times_ms(core, args.steps, args.warmup)))
        low, high = min(medians), max(medians)
        rows.append({"batch": b, "host_ms_per_step_median_low": round(low, 3), "host_ms_per_step_median_high":
                     round(high, 3), "host_us_per_row_low": round(low * 1e3 / b, 2)})
        print(f"batch {b}: {low:.3f}-{high:.3f} ms a step ({rows[-1]['host_us_per_row_low']} us a row at best)")
    if args.profile:
        core = engine(rows[-1]["batch"], args.prompt_len)
        step_times_ms(core, 0, args.warmup)
        prof = cProfile.Profile()
        prof.runcall(step_times_ms, core, 50, 0)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"command": "python bench/host_step_cost.py " + " ".join(sys.argv[1:]),
                  "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                  "method": f"engine core + DecodeLoop, stand-in runner; prompts of {args.prompt_len} tokens; "
                            f"{args.repeats} engines per batch, each the median of {args.steps} steps after "
                            f"{args.warmup}",
                  "points": rows}
        (out / "host-step-cost.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
