"""GPU proof of the engine's recovery from a real device fault (mode 'rapid' under CUDA MPS). Needs a GPU.

    python bench/fault_probe.py [--model DIR] [--role prefill] [--out fault-probe.json]

With a tiny random Llama (tests/tiny.py; or --model), mode 'rapid', eager (no compile), the script:
  1. measures GPU memory (torch.cuda.mem_get_info in a fresh subprocess) before any engine: the baseline;
  2. starts the engine with RAPID_FAULT_INJECT=ROLE:1 (rapid/worker/process.py): that worker launches a Triton
     kernel storing 4 TiB past its buffer on its first batch (an illegal-address fault: fatal to its CUDA
     context and, under MPS, to every client of the MPS server); unsets the variable at once, so the
     restarted workers do not fault;
  3. sends long prompts: expects EngineDeadError naming a process, then checks every process of that
     incarnation is gone (exit codes recorded: who died by itself, who was stopped);
  4. generates again: the engine restarts all its processes; the new workers must be MPS clients (the
     start checks get_client_list) and the output must equal the in-process engine's (greedy);
  5. measures GPU memory with the restarted engine (vs. the first incarnation's, measured before the fault)
     and after shutdown (vs. the baseline);
and prints one JSON object (also written to --out). "ok" is true when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE_MIB = 64
PROBE = "import json, torch; f, t = torch.cuda.mem_get_info(); print(json.dumps([f, t]))"


def used_mib(pipe_dir: str | None = None) -> float:
    """GPU memory in use, seen by a fresh process (an MPS client of pipe_dir when given)."""
    env = dict(os.environ)
    env.pop("RAPID_FAULT_INJECT", None)
    if pipe_dir:
        env["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed (MPS pipe {pipe_dir}): {out.stderr[-2000:]}")
    free, total = json.loads(out.stdout.strip().splitlines()[-1])
    return (total - free) / 2**20


def mps_clients(daemon) -> dict:
    from rapid.engine.mps import _control

    servers = _control(daemon.pipe_dir, "get_server_list").split()
    return {s: _control(daemon.pipe_dir, f"get_client_list {s}").split() for s in servers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: a tiny random Llama)")
    parser.add_argument("--role", default="prefill", choices=("prefill", "decode"))
    parser.add_argument("--out", default="fault-probe.json")
    a = parser.parse_args()
    if a.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny import make_tiny_model

        a.model = str(make_tiny_model(tempfile.mkdtemp(prefix="fault-probe-"), "llama", seed=3))

    from rapid import LLM, SamplingParams
    from rapid.engine.client import EngineDeadError

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5 + i, 5 + i + 200))} for i in range(8)]
    r: dict = {"model": a.model, "role": a.role, "tolerance_mib": TOLERANCE_MIB}
    r["baseline_mib"] = used_mib()

    os.environ["RAPID_FAULT_INJECT"] = f"{a.role}:1"
    try:
        llm = LLM(a.model, mode="rapid", enforce_eager=True, max_num_batched_tokens=256,
                  placement="static")  # every prompt through the prefill worker (the faulting one)
    finally:
        del os.environ["RAPID_FAULT_INJECT"]  # read by the workers at their spawn: a restart spawns clean ones
    client = llm.engine
    try:
        mps = client.mps
        r["mps"] = {"pipe_dir": mps.pipe_dir if mps else None, "started_by_engine": bool(mps and mps.started)}
        r["first_mib"] = used_mib(mps.pipe_dir if mps else None)
        first = list(client.children)
        r["first_pids"] = {c.name: c.process.pid for c in first}
        t0 = time.monotonic()
        try:
            llm.generate(prompts, greedy, use_tqdm=False)
            r["fault_error"] = None
        except EngineDeadError as e:
            r["fault_error"] = str(e).splitlines()[0]
        r["fault_noticed_s"] = round(time.monotonic() - t0, 3)
        r["first_exit_codes"] = {c.name: c.process.poll() for c in first}
        r["first_all_stopped"] = all(code is not None for code in r["first_exit_codes"].values())

        t0 = time.monotonic()
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        r["restart_and_generate_s"] = round(time.monotonic() - t0, 3)
        r["num_restarts"] = client.get_stats().num_restarts
        r["second_pids"] = {c.name: c.process.pid for c in client.children}
        r["mps_clients_after_restart"] = mps_clients(mps) if mps else None
        r["second_mib"] = used_mib(mps.pipe_dir if mps else None)
    finally:
        llm.shutdown()
    r["after_shutdown_mib"] = used_mib()

    with LLM(a.model, enforce_eager=True, max_num_batched_tokens=256) as hybrid:  # in-process: the oracle
        ref = [o.outputs[0].token_ids for o in hybrid.generate(prompts, greedy, use_tqdm=False)]
    r["tokens_equal_hybrid"] = outs == ref
    r["restart_leak_mib"] = round(r["second_mib"] - r["first_mib"], 1)
    r["shutdown_leak_mib"] = round(r["after_shutdown_mib"] - r["baseline_mib"], 1)
    r["ok"] = bool(r["fault_error"] and r["first_all_stopped"] and r["num_restarts"] == 1 and r["tokens_equal_hybrid"]
                   and abs(r["restart_leak_mib"]) <= TOLERANCE_MIB and abs(r["shutdown_leak_mib"]) <= TOLERANCE_MIB)
    text = json.dumps(r, indent=2)
    print(text)
    Path(a.out).write_text(text + "\n")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
