"""Entry point of every engine child process: `python -m rapid.engine.child ROLE`, arguments on stdin.

A fresh interpreter (spawn semantics) that never re-imports the user's main module; the arguments
arrive as msgspec-encoded bytes, never pickle.
"""

from __future__ import annotations

import sys


def main() -> int:
    role = sys.argv[1]
    raw = sys.stdin.buffer.read()
    if role == "decode":
        from rapid.worker.process import decode_main as fn
    elif role == "prefill":
        from rapid.worker.process import prefill_main as fn
    elif role == "core":
        from rapid.engine.core_process import core_main as fn
    else:
        print(f"unknown role {role!r}", file=sys.stderr)
        return 2
    fn(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
