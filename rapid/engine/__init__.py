"""The engine: the one core loop (core.py), its clients (in-process: inproc.py; multi-process: mp_client.py, over
one incarnation of processes.py's children, with the core's own process in core_process.py), the process topology
of each mode (launch.py), the clean-up after a killed owner (reaper.py), ZeroMQ plumbing (ipc.py) and MPS
(mps.py)."""

from __future__ import annotations


def make_client(config, tokenizer, eos_token_ids):
    """The EngineClient for a config: the in-process core for 'hybrid' (unless engine_process); the core in its
    own process, with its workers, otherwise. Only the client differs between the modes."""
    if config.mode == "hybrid" and not config.engine_process:
        from rapid.engine.inproc import InprocClient

        return InprocClient(config, tokenizer, eos_token_ids)
    from rapid.engine.mp_client import MPClient

    return MPClient(config, eos_token_ids)  # the core process loads its own tokenizer
