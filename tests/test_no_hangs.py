"""Nothing waits for ever: an AsyncClient closed while other tasks await replies, clients of an address where no
server listens, a RapidServer closed by a signal handler while serve_forever runs in the same (main) thread, and
requests sent to an engine core that died with its inbox full. The process-level cases run in a child with a
watchdog, so a regression fails instead of hanging."""

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from rapid.client import AsyncClient, Client, NoServerError, ServerError

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


@pytest.mark.parametrize("there", ["nothing", "a stale socket file"])
def test_clients_of_an_address_where_no_server_listens_fail_fast(tmp_path, there):
    """Client and AsyncClient with timeout_s None used to wait for ever for a reply from an ipc:// path where no server
    listens (no file, or the socket file of a killed server): a request now raises NoServerError (a ServerError and a
    ConnectionError) naming the address within connect_timeout_s (5 s by default; 1 s asked beside a stale file)."""
    path = tmp_path / "nobody.sock"
    limits = {} if there == "nothing" else {"connect_timeout_s": 1.0}
    if there != "nothing":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # the file stays; nothing listens on it
        assert path.exists()
    address = f"ipc://{path}"
    outcome = []

    def blocking():
        t0 = time.monotonic()
        try:
            with Client(address, timeout_s=None, **limits) as client:
                client.generate("hello", {"max_tokens": 4})
        except Exception as e:
            outcome.append((e, time.monotonic() - t0))

    waiter = threading.Thread(target=blocking, daemon=True)
    waiter.start()
    waiter.join(30)
    assert not waiter.is_alive(), "Client waited for ever for a server that is not there"
    (error, took), = outcome
    assert isinstance(error, NoServerError) and isinstance(error, ServerError) and isinstance(error, ConnectionError)
    assert address in str(error) and "no server answered" in str(error) and took < 8.0, (error, took)

    async def streamed():
        async with AsyncClient(address, **limits) as client:
            t0 = time.monotonic()
            with pytest.raises(NoServerError, match="no server answered at ipc://") as raised:
                async for _ in client.stream("hello", {"max_tokens": 4}):
                    pass
            return raised.value, time.monotonic() - t0

    error, took = asyncio.run(asyncio.wait_for(streamed(), 30))  # (a regression: TimeoutError, not a hang)
    assert address in str(error) and took < 8.0


def run_script(tmp_path, text: str, model) -> list[str]:
    """Run `text` as a script in a child (its own watchdog turns a hang into exit 1); the lines it printed."""
    script = tmp_path / "script.py"
    script.write_text(text)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    proc = subprocess.run([sys.executable, str(script), str(model)], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


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
    lines = run_script(tmp_path, SERVE_UNTIL_SIGTERM, tiny_llama)
    address, last = lines[0], lines[-1]
    assert last == "serve_forever returned; closed: True"
    assert not os.path.exists(os.path.dirname(address.removeprefix("ipc://")))  # the socket directory went too


CORE_DIES_BETWEEN_CALLS = """
import faulthandler, os, signal, sys
from rapid import LLM, SamplingParams
from rapid.engine.client import EngineDeadError

llm = LLM(sys.argv[1], engine_process=True, max_model_len=64)
params = SamplingParams(max_tokens=2)
assert len(llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0].token_ids) == 2
core = next(c for c in llm.engine.children if c.name == "core")
os.kill(core.process.pid, signal.SIGKILL)
core.process.wait()
faulthandler.dump_traceback_later(60, exit=True)
try:
    llm.generate(["hello"] * 3000, params, use_tqdm=False)  # more than the inbox's 1,000 queued messages
    print("no error")
except EngineDeadError as e:
    print("EngineDeadError:", str(e).splitlines()[0])
print("after the restart:", len(llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0].token_ids), flush=True)
faulthandler.cancel_dump_traceback_later()
llm.shutdown()
"""


def test_requests_for_a_core_that_died_with_its_inbox_full_fail_instead_of_hanging(tiny_llama, tmp_path):
    """The engine's sends to its core blocked once 1,000 were queued: a core killed between two generate() calls
    hung the next call of more prompts than that for good (no death check ran while the send waited)."""
    lines = run_script(tmp_path, CORE_DIES_BETWEEN_CALLS, tiny_llama)
    assert lines[0].startswith("EngineDeadError: core process") and "died" in lines[0], lines
    assert lines[1] == "after the restart: 2"
