"""The engine's check of a worker's reported memory peak against its plan: torch-free, for the engine's frontend."""

from __future__ import annotations

import logging

logger = logging.getLogger("rapid.worker.memory")


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_process_memory(name: str, peak_bytes: int, allowed_bytes: int) -> bool:
    """Warn (naming the process) when its peak torch memory went past what the KV plan allowed it.

    allowed_bytes <= 0 means no plan (CPU, or kv_cache_memory_bytes given): nothing to check.
    """
    if allowed_bytes <= 0 or peak_bytes <= allowed_bytes:
        return True
    logger.warning("%s: peak torch memory %s exceeds the %s the KV sizing planned for it (by %s); "
                   "lower gpu_memory_utilization if the GPU runs out of memory",
                   name, gib(peak_bytes), gib(allowed_bytes), gib(peak_bytes - allowed_bytes))
    return False
