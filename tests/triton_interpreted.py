"""Run a test module's kernel cases under Triton's interpreter on the CPU, in a subprocess (TRITON_INTERPRET=1 is read
when a kernel module is imported, which other tests may have done): the module prints one `RESULT <json>` line per
case when run as a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def interpreted_results(script: str, num_cases: int) -> list[dict]:
    """The RESULT lines of `python script` under the interpreter; fails with its output unless there are num_cases."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == num_cases, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return lines
