"""GPU micro-benchmark: the device time of one sampling step, the engine's sampler against the one it replaced.

Llama-3.1-8B's vocabulary (128,256), float32 logits as compute_logits gives them, rows as `rapid bench offline`
builds them (temperature 0.6, a seed per request) and three variants of a batch: every row seeded, none seeded,
greedy. 'before' is the sampler up to session 15, kept here only to be measured: softmax, exponential noise for
the batch from the engine's generator, then for each seeded row a generator of its own seeded and a fresh
row of noise, then argmax(probs / q). 'now' is rapid.worker.sampler.sample_async (rapid.worker.exponential_race:
one Triton pass, seeded rows cost nothing more). Medians of CUDA-event timings after warm-up, each call
including SamplingBatch.build (host) and the logprob of the sampled token, as in a decode step.

Usage (on the GPU machine): python3 bench/sampler_cost.py [--out DIR]   writes sampler-<gpu>.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid.params import SamplingParams  # noqa: E402
from rapid.worker.sampler import SamplingBatch, sample_async  # noqa: E402
from rapid.worker.sampler_ops import mix_seed  # noqa: E402

V = 128256


def sample_before(logits, batch: SamplingBatch, generator):
    """The replaced random path (every row random here): softmax, then the exponential race with per-row generators."""
    x = logits / batch.temperature[:, None]
    probs = x.softmax(dim=-1)
    q = torch.empty_like(probs)
    q.exponential_(generator=generator)
    if batch.seeded_rows:
        row_gen = torch.Generator(device=logits.device)
        for row, s in zip(batch.seeded_rows, batch.seeded_keys):
            row_gen.manual_seed(s)
            q[row].exponential_(generator=row_gen)
    q = q.clamp_min_(torch.finfo(torch.float32).tiny)
    tokens = (probs / q).argmax(dim=-1)
    lp = logits.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return tokens, lp


def _events(fn, reps: int, sleep_cycles: int) -> list[float]:
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        if sleep_cycles:
            torch.cuda._sleep(sleep_cycles)  # the GPU busy while the host enqueues fn, as behind a decode step
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def timings(fn, reps: int = 30, warmup: int = 5) -> tuple[float, float, float]:
    """Medians in ms: (device time of fn's kernels alone, device time when the GPU waits for the host to enqueue
    them, host time to enqueue). The first puts a sleep kernel longer than the host's work ahead of fn, as the
    engine's decode step (its graph replay) does, and subtracts the sleep measured alone."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    exposed = statistics.median(_events(fn, reps, 0))
    cycles = int(40e6)  # about 20 ms
    kernels = statistics.median(_events(fn, reps, cycles)) - statistics.median(_events(lambda: None, reps, cycles))
    return kernels, exposed, statistics.median(host)


def profile_host(fn, calls: int = 300) -> str:
    """Where the host time of a call goes: cProfile over `calls` calls, the top functions by own time."""
    import cProfile
    import io
    import pstats

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    return text.getvalue()[-3500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    logits1 = torch.randn(1, V, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for B in (1, 64, 256):
        logits = torch.randn(B, V, device=dev) * 3
        for kind in ("seeded", "unseeded", "greedy"):
            if kind == "greedy":
                params = [SamplingParams(temperature=0.0, ignore_eos=True)] * B
            else:
                params = [SamplingParams(temperature=0.6, ignore_eos=True, seed=1000 + i if kind == "seeded" else None)
                          for i in range(B)]
            steps = list(range(B))

            def build():
                return SamplingBatch.build(params, None, None, steps, V, dev)

            row = {"batch": B, "rows": kind}
            variants = [("now", lambda: sample_async(logits, build(), gen))]
            if kind != "greedy":
                variants.append(("before", lambda: sample_before(logits, build(), gen)))
            for label, fn in variants:
                kernels, exposed, host = timings(fn)
                row.update({f"{label}_kernels_ms": round(kernels, 4), f"{label}_exposed_ms": round(exposed, 4),
                            f"{label}_host_ms": round(host, 4)})
            rows.append(row)
            print(row, flush=True)
    host_profile = profile_host(lambda: sample_async(logits1, SamplingBatch.build(
        [SamplingParams(temperature=0.6, seed=7)], None, None, [0], V, dev), gen))
    print(host_profile, flush=True)
    name = torch.cuda.get_device_name()
    gpu = "h200" if "H200" in name else "h100" if "H100" in name else "gpu"
    report = {"command": "python3 bench/sampler_cost.py", "device": name, "torch": torch.__version__,
              "vocab": V, "method": __doc__.split("Usage")[0].strip(), "rows": rows,
              "check_mix_seed": mix_seed(1000, 0),
              "host_profile_batch1_seeded": host_profile}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sampler-{gpu}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# One sampling step's device time: {name}", "", f"`{report['command']}`, torch {torch.__version__}. "
             "Vocabulary 128,256, float32 logits; medians of CUDA events after warm-up, SamplingBatch.build "
             "included. kernels: the device time of the sampler's kernels with the GPU kept busy while the host "
             "enqueues them (as behind a decode step); exposed: the same with the GPU waiting for the host; host: "
             "the time to enqueue.", "",
             "| batch | rows | before: kernels / exposed / host ms | now: kernels / exposed / host ms |",
             "|---|---|---|---|"]

    def cells(r, label):
        if f"{label}_kernels_ms" not in r:
            return "(the same path)"
        return " / ".join(str(r[f"{label}_{k}_ms"]) for k in ("kernels", "exposed", "host"))

    for r in rows:
        lines.append(f"| {r['batch']} | {r['rows']} | {cells(r, 'before')} | {cells(r, 'now')} |")
    (out / f"sampler-{gpu}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
