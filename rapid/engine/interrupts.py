"""Ctrl-C held back until an in-process engine call ends, so that it never cuts a step in half.

Mode 'hybrid' runs its engine steps in the caller's thread. A KeyboardInterrupt raised in the middle of one (the
batch sent to the executor, its results not yet applied to the scheduler) left that step's requests waiting for
results that would never come. `interrupts_deferred()` holds a SIGINT that arrives during the call and raises the
KeyboardInterrupt as the call ends, with the engine consistent: the caller's own clean-up (LLM.generate's aborts)
then works as usual. Steps are short, so Ctrl-C still answers at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT for the body (main thread only, and only where Python's own Ctrl-C handler is installed: a
    program's own handler is left alone); raise KeyboardInterrupt after it if one came."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt
