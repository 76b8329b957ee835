"""Closing never waits for ever: an AsyncClient closed while other tasks await replies, and a RapidServer closed
by a signal handler while serve_forever runs in the same (main) thread."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from rapid.client import AsyncClient, ServerError

ROOT = Path(__file__).parents[1]


def test_closing_an_async_client_ends_the_requests_other_tasks_await(tmp_path):
    """They used to wait for ever (timeout_s None): nothing posted to their queues once the reader was cancelled."""
    address = f"ipc://{tmp_path}/silent.sock"
    server_ctx = zmq.Context()
    silent = server_ctx.socket(zmq.ROUTER)  # takes requests, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(address)
    ctx = zmq.asyncio.Context()

    async def main():
        client = AsyncClient(address, context=ctx)
        waiting = asyncio.ensure_future(client.generate("hello", {"max_tokens": 4}))
        assert await asyncio.get_running_loop().run_in_executor(None, silent.poll, 5000)  # the request arrived
        await client.close()
        with pytest.raises(ServerError, match="the client was closed before this request ended"):
            await asyncio.wait_for(waiting, 5)

    try:
        asyncio.run(main())
    finally:
        silent.close()
        server_ctx.term()
        ctx.term()


SERVE_UNTIL_SIGTERM = """
import faulthandler, os, signal, sys, threading
from rapid import LLM
from rapid.server import RapidServer

faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test with the stacks, not a stuck run
llm = LLM(sys.argv[1], max_model_len=128)
server = RapidServer(llm)
signal.signal(signal.SIGTERM, lambda *_: server.close())
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
print(server.address, flush=True)
server.serve_forever()
print("serve_forever returned; closed:", server._closed, flush=True)
"""


def test_a_server_closed_by_a_signal_handler_inside_serve_forever_stops(tiny_llama, tmp_path):
    """close() from a handler that interrupts serve_forever in the main thread waited for serve_forever to end,
    further down its own stack; now serve_forever finishes the close as it returns."""
    script = tmp_path / "serve.py"
    script.write_text(SERVE_UNTIL_SIGTERM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    address, last = proc.stdout.splitlines()[0], proc.stdout.splitlines()[-1]
    assert last == "serve_forever returned; closed: True"
    assert not os.path.exists(os.path.dirname(address.removeprefix("ipc://")))  # the socket directory went too
