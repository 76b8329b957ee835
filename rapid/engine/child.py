"""Entry point of every engine child process: `python -m rapid.engine.child ROLE [pdeathsig]`.

A fresh interpreter (spawn semantics) that never re-imports the user's main module. It imports its
role's modules at once (every child of an engine is spawned together, so these overlap), then reads its
arguments: they arrive on stdin as length-prefixed msgspec bytes, never pickle, and stdin then stays open: it is the
parent-process watch (EOF = the parent process is gone, whichever of its threads started us), see
ipc.watch_parent. `pdeathsig` (the parent started us from its main thread) adds the kernel's
parent-death signal. Python faults (SIGSEGV...) dump a traceback into the log (stderr). A role that
fails has logged its traceback; the last log line then names the cause, a bad input (ValueError...) is also written
to the cause file the parent named (so the owner raises it as such), and the process exits at once (no exit-time
hooks that could hang on a broken device or append warnings after the cause).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

from rapid.engine import ipc


def main() -> int:
    role = sys.argv[1]
    faulthandler.enable(all_threads=False)  # stderr is the child's log file
    if "pdeathsig" in sys.argv[2:]:
        ipc.die_with_parent()
    # The role's imports (torch...) first: they overlap the earlier stages' start; the arguments come after.
    if role == "decode":
        from rapid.worker.process import decode_main as fn
    elif role in ("prefill", "prefill2"):
        from rapid.worker.process import prefill_main as fn
    elif role == "core":
        from transformers import AutoTokenizer  # noqa: F401 - the core's slowest import (its tokenizer), early

        from rapid.engine.core_process import core_main as fn
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    raw = ipc.read_args(sys.stdin.fileno())  # exits if the parent is already gone
    ipc.watch_parent(sys.stdin.fileno())
    try:
        fn(raw)
    except Exception as e:  # the role logged the traceback; end the log with the cause and leave now
        logging.getLogger("rapid.engine.child").critical("%s process exits with code 1 after %s: %s", role,
                                                         type(e).__name__, e)
        ipc.write_cause(os.environ.get(ipc.CAUSE_ENV), e)
        _leave(1)
    _leave(0)  # everything is closed: skip the interpreter's teardown (torch's takes seconds)
    return 0


def _leave(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
