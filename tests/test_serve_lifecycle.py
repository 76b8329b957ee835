"""`rapid serve` and its ZeroMQ endpoint from outside, around their lifecycle: a signal while the engine starts, a
server process SIGKILLed. Observed: the exit code, what it printed, its children, its socket directories."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rapid.engine import ipc
from tiny import gone, wait_until

ROOT = Path(__file__).parents[1]


def private_env(tmp_path: Path) -> dict:
    """TMPDIR of the process: where its private socket directories go (rapid-PID-*)."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp_path / "tmp"), PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))


def socket_dirs(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "tmp").iterdir() if p.name.startswith("rapid-")]


def recorded_children(tmp_path: Path) -> dict[str, int]:
    """role -> pid of the children recorded in the engine's directory (empty before the engine starts them)."""
    kids = {}
    for d in socket_dirs(tmp_path):
        try:
            lines = (d / ipc.CHILDREN_FILE).read_text().splitlines()
        except OSError:
            continue
        kids.update({ln.split()[2]: int(ln.split()[0]) for ln in lines if len(ln.split()) == 3})
    return kids


def test_a_signal_while_the_engine_starts_stops_the_start(tiny_llama, tmp_path):
    """SIGTERM once the engine's process is started but before it is ready: `rapid serve` used to finish the start
    (minutes on a GPU), bind its ports, print 'RAPID serving' and only then stop; it now cuts the start short,
    cleans up and exits 0 without serving."""
    proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", str(tiny_llama), "--port", "0",
                             "--device", "cpu", "--mode", "hybrid", "--engine-process"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=private_env(tmp_path))
    try:
        assert wait_until(lambda: "core" in recorded_children(tmp_path) or proc.poll() is not None, timeout=60)
        kids = recorded_children(tmp_path)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "RAPID serving" not in out and "RAPID server stopped" in out
    assert "signal 15 during the engine start" in err
    assert time.monotonic() - t0 < 15.0  # a loaded 2-core machine's bound; the messages above prove the cut
    assert wait_until(lambda: all(gone(pid) for pid in kids.values()), timeout=5.0)
    assert not socket_dirs(tmp_path)


def test_a_sigkilled_servers_socket_directory_goes_with_it(tmp_path):
    """The private directory (and socket file) of a server's default ipc:// address: removed by its reaper when
    the server is SIGKILLed (it used to stay until the next engine started in that TMPDIR)."""
    script = tmp_path / "server.py"
    script.write_text(
        "import time, zmq\n"
        "from rapid.entrypoints.zmq_endpoint import Endpoint\n"
        "ep = Endpoint(zmq.Context().socket(zmq.ROUTER), None)\n"
        "print(ep.address, flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=private_env(tmp_path))
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("ipc://"), proc.stderr.read()[-3000:]
        path = Path(address.removeprefix("ipc://"))
        assert path.exists() and path.parent in socket_dirs(tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not path.parent.exists(), timeout=5.0)
    assert not socket_dirs(tmp_path)


FAKE_SERVER = (  # answers every request with one unfinished Delta, then never again (until it is killed)
    "import sys, msgspec, zmq\n"
    "from rapid.protocol.api import Delta, ClientMessage\n"
    "sock = zmq.Context().socket(zmq.ROUTER)\n"
    "sock.bind(sys.argv[1])\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    peer, raw = sock.recv_multipart()\n"
    "    req = msgspec.msgpack.decode(raw, type=ClientMessage)\n"
    "    sock.send_multipart([peer, msgspec.msgpack.encode(Delta(req.client_request_id, [5], 'a'))])\n"
)


def start_fake_server(tmp_path: Path, address: str) -> subprocess.Popen:
    """FAKE_SERVER on `address`, once it is bound."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    proc = subprocess.Popen([sys.executable, str(script), address], stdout=subprocess.PIPE, text=True,
                            env=private_env(tmp_path))
    try:
        assert proc.stdout.readline() == "ready\n"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def test_clients_in_flight_fail_when_the_server_is_killed(tmp_path):
    """rapid.client's Client and AsyncClient: requests in flight when the server is SIGKILLed raise ServerError at
    once (they used to wait forever without timeout_s, and until it with one); a request sent once a server is back
    is served."""
    import asyncio
    import threading

    import pytest

    from rapid.client import AsyncClient, Client, ServerError

    address = f"ipc://{tmp_path}/fake.sock"

    async def async_stream(results):
        async with AsyncClient(address, timeout_s=10) as c:
            async for d in c.stream("hi", {"max_tokens": 4}):
                results.append(d.new_text)

    for i in range(1000):  # each client's connection monitor has an inproc name of its own (no EADDRINUSE)
        Client(address).close()
        if i % 100 == 99:  # libzmq frees closed sockets on a thread of its own: let it catch up, or its limit of
            time.sleep(0.05)  # 1,023 sockets at once is reached (about 500-2,700 tight create/close cycles here)
    server = start_fake_server(tmp_path, address)
    failures = {}

    def run_async():
        results = []
        try:
            asyncio.run(async_stream(results))
        except ServerError as e:
            failures["async"] = (results, str(e))

    waiter = threading.Thread(target=run_async, daemon=True)
    try:
        with Client(address, timeout_s=10) as client:
            stream = client.stream("hi", {"max_tokens": 4})
            assert next(stream).new_text == "a"
            waiter.start()
            time.sleep(0.5)  # the async client has its first Delta too
            server.kill()
            server.wait()
            t0 = time.monotonic()
            with pytest.raises(ServerError, match="the connection to .* closed"):
                next(stream)
            assert time.monotonic() - t0 < 5.0
            waiter.join(5.0)
            assert not waiter.is_alive() and failures["async"][0] == ["a"]
            assert "closed (the server stopped or was killed)" in failures["async"][1]
            server = start_fake_server(tmp_path, address)  # a new server, same address: the client works again
            assert next(client.stream("hi", {"max_tokens": 4})).new_text == "a"
    finally:
        server.kill()
        server.wait()


def test_requests_in_flight_fail_when_the_server_stops_answering(tmp_path):
    """A server that stops answering without closing the connection (here SIGSTOP; a host gone, a partition): the
    client's heartbeats end the connection, so a request in flight raises ServerError instead of waiting for ever
    (timeout_s None)."""
    import signal
    import threading

    import zmq

    from rapid.client import Client, ServerError

    address = f"ipc://{tmp_path}/fake.sock"
    proc = start_fake_server(tmp_path, address)
    ctx = zmq.Context()  # the client's own: a regression leaves a thread waiting in it, not in the shared one
    outcome = []
    try:
        client = Client(address, context=ctx)
        stream = client.stream("hi", {"max_tokens": 4})
        assert next(stream).new_text == "a"
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()

        def wait_for_the_rest():
            try:
                next(stream)
            except ServerError as e:
                outcome.append((str(e), time.monotonic() - t0))

        waiter = threading.Thread(target=wait_for_the_rest, daemon=True)
        waiter.start()
        waiter.join(60)
        assert outcome and "the connection to" in outcome[0][0] and "closed" in outcome[0][0], outcome
        assert outcome[0][1] < 30  # the heartbeat's timeout is 10 s
        client.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    if outcome:
        ctx.term()


def test_a_sigkilled_servers_explicit_ipc_path_goes_with_it(tiny_llama, tmp_path):
    """`rapid serve --address ipc://PATH` (its engine in a process of its own, beside the engine's reaper) SIGKILLed:
    the reaper, which sees the server's process die, removes PATH and PATH.lock (they used to stay until the next
    server on that path replaced them), and every child of the server exits."""
    import psutil

    path = tmp_path / "explicit.sock"
    lock = Path(f"{path}.lock")
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", str(tiny_llama), "--no-http",
                                 "--device", "cpu", "--engine-process", "--address", f"ipc://{path}"],
                                stdout=subprocess.DEVNULL, stderr=log, env=private_env(tmp_path))
    try:
        assert wait_until(lambda: path.exists() or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert len(kids) >= 2 and lock.exists()  # the engine core and the engine's reaper at least
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: not path.exists() and not lock.exists(), timeout=5.0), os.listdir(tmp_path)
        assert wait_until(lambda: all(gone(k.pid) for k in kids), timeout=5.0)
        assert not socket_dirs(tmp_path)
    finally:
        proc.kill()
        proc.wait()


ENDPOINT_SERVER = (  # a bare endpoint at an explicit ipc:// path, recorded in a directory for a reaper, until killed
    "import sys, time, zmq\n"
    "from rapid.entrypoints.zmq_endpoint import Endpoint\n"
    "ep = Endpoint(zmq.Context().socket(zmq.ROUTER), sys.argv[1], reaper_dir=sys.argv[2])\n"
    "print(ep.address, flush=True)\n"
    "time.sleep(60)\n"
)


def test_the_reaper_removes_a_dead_servers_endpoint_files_never_a_live_ones(tmp_path):
    """What the engine's reaper does for explicit ipc:// paths, without an engine: the files of a killed server are
    removed, but not while a live process holds the lock (here a successor on the same path), and a server that
    exits cleanly takes its record away with its files."""
    import zmq

    from rapid.engine import reaper
    from rapid.entrypoints.zmq_endpoint import Endpoint

    records, path = tmp_path / "engine-dir", tmp_path / "explicit.sock"
    records.mkdir()
    lock, address = Path(f"{path}.lock"), f"ipc://{path}"
    script = tmp_path / "endpoint_server.py"
    script.write_text(ENDPOINT_SERVER)

    def killed_server():
        proc = subprocess.Popen([sys.executable, str(script), address, str(records)], stdout=subprocess.PIPE,
                                text=True, env=private_env(tmp_path))
        assert proc.stdout.readline().strip() == address
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert path.exists() and lock.exists()  # nothing removed them yet

    killed_server()
    ctx = zmq.Context()
    successor = Endpoint(ctx.socket(zmq.ROUTER), address, reaper_dir=str(records))  # live: holds the lock
    assert reaper.remove_dead_endpoints(str(records), lock_wait_s=0.2) == []
    assert path.exists() and lock.exists()  # the live server's files stay
    successor.release()
    assert not path.exists() and not lock.exists() and len(os.listdir(records)) == 1  # its own record went too
    killed_server()  # (the first one's record names files gone since: it is passed over)
    assert reaper.remove_dead_endpoints(str(records)) == [str(path)]
    assert not path.exists() and not lock.exists()
    ctx.term()
