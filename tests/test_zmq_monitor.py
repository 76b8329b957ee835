"""The clients' and the server's disconnect monitors never stall a ZeroMQ context's I/O thread (libzmq sends monitor
events with a blocking send from that thread). Each test runs on a private context, so a regression fails here
without hanging the process-wide zmq.Context.instance() the other tests' clients use."""

import asyncio
import socket
import threading
import time
from contextlib import contextmanager

import zmq
import zmq.asyncio

from rapid.client import AsyncClient, Client
from rapid.entrypoints.zmq_monitor import close_monitored, open_disconnect_monitor

WAIT_MS = 5000
STALLED = []  # contexts of failed tests: terminating one would wait for ever on its blocked I/O thread


@contextmanager
def private_context(kind=zmq.Context):
    """A context of the test's own, terminated when the test passes and kept (never terminated) when it fails."""
    ctx = kind()
    try:
        yield ctx
    except BaseException:
        STALLED.append(ctx)
        raise
    ctx.term()


def serve_once(server_ctx: zmq.Context, address: str) -> zmq.Socket:
    router = server_ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(address)
    return router


def reaches(ctx: zmq.Context, directory) -> bool:
    """Whether a new DEALER of `ctx` gets a message to a live ROUTER (of a context of its own) within WAIT_MS."""
    server_ctx = zmq.Context()
    router = serve_once(server_ctx, f"ipc://{directory}/live.sock")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDTIMEO, WAIT_MS)
    try:
        dealer.connect(f"ipc://{directory}/live.sock")
        dealer.send(b"ping")
        return bool(router.poll(WAIT_MS))
    except zmq.Again:
        return False
    finally:
        dealer.close()
        router.close()
        server_ctx.term()


def test_a_client_closed_just_before_its_server_goes_does_not_stall_the_context(tmp_path):
    """The reader of a client's monitor used to close before the monitor stopped: the server leaving right after
    (its connection closing) made the I/O thread block for ever, and every socket of the context with it."""
    with private_context() as ctx:
        for i in range(100):
            with private_context() as server_ctx:
                router = serve_once(server_ctx, f"ipc://{tmp_path}/s{i}.sock")
                client = Client(f"ipc://{tmp_path}/s{i}.sock", context=ctx)
                client._sock.send(b"")  # an empty frame (the server's liveness probe size): the connection is up
                assert router.poll(WAIT_MS), f"the context stalled after {i} clients"
                client.close()
                router.close()  # the server goes at once
        assert reaches(ctx, tmp_path)


def test_an_async_client_closed_just_before_its_server_goes_does_not_stall_the_context(tmp_path):
    async def one(ctx, i):
        with private_context() as server_ctx:
            router = serve_once(server_ctx, f"ipc://{tmp_path}/a{i}.sock")
            client = AsyncClient(f"ipc://{tmp_path}/a{i}.sock", context=ctx)
            await asyncio.wait_for(client._sock.send(b""), WAIT_MS / 1000)
            assert router.poll(WAIT_MS), f"the context stalled after {i} clients"
            await client.close()
            router.close()

    async def main(ctx):
        for i in range(100):
            await one(ctx, i)

    with private_context(zmq.asyncio.Context) as ctx:
        asyncio.run(main(ctx))
        assert reaches(zmq.Context(ctx), tmp_path)  # a sync shadow of the same context: the same I/O thread


def test_unread_disconnect_events_do_not_stall_the_context(tmp_path):
    """A server that keeps closing connections at once (a crash loop, say) while the owner reads nothing: past
    libzmq's default limit of about 2,000 queued events the I/O thread used to block until someone read."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{tmp_path}/flap.sock")
    listener.listen(64)
    listener.settimeout(0.2)
    closed, stop = [0], threading.Event()

    def close_every_connection():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()
            closed[0] += 1

    flapper = threading.Thread(target=close_every_connection, daemon=True)
    flapper.start()
    try:
        with private_context() as ctx:
            unread_disconnects_leave_the_context_working(ctx, tmp_path, closed)
    finally:
        stop.set()
        flapper.join(5)
        listener.close()


def unread_disconnects_leave_the_context_working(ctx, tmp_path, closed):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RECONNECT_IVL, 1)
    monitor = open_disconnect_monitor(sock)
    sock.connect(f"ipc://{tmp_path}/flap.sock")
    deadline = time.monotonic() + 60
    while closed[0] < 2500 and time.monotonic() < deadline:
        time.sleep(0.05)
    # on a failure nothing is closed: stopping a monitor waits for the send its I/O thread is blocked in
    assert closed[0] >= 2500, f"only {closed[0]} connections in 60 s: the I/O thread stalled"
    assert reaches(ctx, tmp_path)
    events = 0
    while monitor.poll(0):
        monitor.recv_multipart()
        events += 1
    assert events >= 2500  # every disconnect was kept for the owner to read
    close_monitored(sock, monitor)
