"""The ZeroMQ server and its clients on the CPU (hybrid engine, tiny model): streaming equals non-streaming
equals LLM.generate, concurrent clients, cancel, edge validation, garbage on the socket, asyncio, clean close."""

import asyncio
import os
import random
import socket
import threading
import time
from contextlib import contextmanager

import msgspec
import pytest
import zmq

from rapid import LLM, SamplingParams
from rapid.client import AsyncClient, Client, ServerError
from rapid.protocol.api import CancelRequest, Completion, Delta, ErrorReply, GenerateRequest, ServerMessage
from rapid.server import RapidServer, check_address

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(tiny_llama, max_model_len=512) as llm:
        yield llm


@contextmanager
def serving(llm, address=None, **kw):
    server = RapidServer(llm, address, **kw).start()
    try:
        yield server
    finally:
        server.close()
    assert not llm.engine.get_stats().num_requests


@pytest.fixture
def server(llm):
    with serving(llm) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server.address, timeout_s=TIMEOUT) as c:
        yield c


@pytest.fixture
def aborts(llm, monkeypatch):
    """Engine request ids the server aborted."""
    seen = []
    original = llm.engine.abort

    def spy(ids):
        seen.extend(ids)
        original(ids)

    monkeypatch.setattr(llm.engine, "abort", spy)
    return seen


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stream_equals_completion_equals_llm_generate(llm):
    expected = llm.generate("Paris is", GREEDY, use_tqdm=False)[0].outputs[0]  # before the server owns the LLM
    with serving(llm) as srv, Client(srv.address, timeout_s=TIMEOUT) as c:
        whole = c.generate("Paris is", GREEDY)
        deltas = list(c.stream("Paris is", GREEDY))
        ids = c.generate({"prompt_token_ids": whole.prompt_token_ids}, GREEDY)
        text_prompt = c.generate({"prompt": "Paris is"}, GREEDY)  # LLM.generate's TextPrompt too
    assert text_prompt.token_ids == expected.token_ids and text_prompt.prompt == "Paris is"
    assert isinstance(whole, Completion) and whole.prompt == "Paris is"
    assert whole.token_ids == expected.token_ids and whole.text == expected.text
    assert whole.finish_reason == "length" and len(whole.token_ids) == 10
    assert whole.arrival_time <= whole.first_token_time <= whole.last_token_time
    assert all(isinstance(d, Delta) for d in deltas) and deltas[-1].finished
    assert not any(d.finished for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    assert "".join(d.new_text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.new_token_ids] == whole.token_ids
    assert deltas[0].num_prompt_tokens == len(whole.prompt_token_ids)
    assert ids.token_ids == whole.token_ids and ids.prompt is None


def test_chat_and_logprobs(llm, client):
    conv = [{"role": "user", "content": "hi"}]
    out = client.chat(conv, GREEDY)
    assert out.prompt.startswith("<|user|>hi") and out.prompt.endswith("<|assistant|>")
    streamed = list(client.chat_stream(conv, GREEDY))
    assert "".join(d.new_text for d in streamed) == out.text
    # roles as the OpenAI endpoint takes them: 'developer' is the template's 'system', an unknown one is refused
    developer = client.chat([{"role": "developer", "content": "be brief"}, *conv], GREEDY)
    assert developer.prompt == client.chat([{"role": "system", "content": "be brief"}, *conv], GREEDY).prompt
    with pytest.raises(ServerError, match=r"messages\[0\]\.role must be one of .*got 'wizard'"):
        client.chat([{"role": "wizard", "content": "hi"}], GREEDY)
    with pytest.raises(ServerError, match=r"messages\[1\]\.content is required for role 'user'"):
        client.chat([{"role": "system", "content": "x"}, {"role": "user"}], GREEDY)
    with pytest.raises(ServerError, match=r"messages\[1\]\.content is required unless it has tool_calls"):
        client.chat([{"role": "user", "content": "x"}, {"role": "assistant"}], GREEDY)
    assert client.chat(conv, GREEDY).text == out.text  # and the server goes on
    lp = client.generate("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2))
    assert len(lp.logprobs) == 4 and all(t in d for t, d in zip(lp.token_ids, lp.logprobs))
    assert lp.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(lp.token_ids, lp.logprobs)), abs=1e-4)
    # streamed as whole: a cumulative logprob with logprobs only (every delta carried 0.0 without them)
    with_lp = list(client.stream("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)))
    assert with_lp[-1].cumulative_logprob == pytest.approx(lp.cumulative_logprob, abs=1e-4)
    assert client.generate("hello", GREEDY).cumulative_logprob is None
    assert all(d.cumulative_logprob is None for d in client.stream("hello", GREEDY))


def test_two_concurrent_clients(llm, server):
    prompts = ["The quick brown", "héllo 世界"]
    results, errors = {}, []
    start = threading.Barrier(2)

    def run(prompt):
        try:
            with Client(server.address, timeout_s=TIMEOUT) as c:
                start.wait()
                # the same client id ("0", "1", ...) on both clients must not collide on the server
                streamed = "".join(d.new_text for d in c.stream(prompt, GREEDY))
                results[prompt] = (streamed, c.generate(prompt, GREEDY).text)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors and len(results) == 2
    for streamed, whole in results.values():
        assert streamed == whole
    assert results[prompts[0]] != results[prompts[1]]


def test_interleaved_streams_on_one_client(client):
    a = client.stream("The quick brown", GREEDY)
    b = client.stream("Paris is", GREEDY)
    got_a, got_b = [next(a)], [next(b)]
    got_a += list(a)
    got_b += list(b)
    assert "".join(d.new_text for d in got_a) == client.generate("The quick brown", GREEDY).text
    assert "".join(d.new_text for d in got_b) == client.generate("Paris is", GREEDY).text


def test_refuse_new_during_a_shutdown_grace_keeps_running_requests(server, client):
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    running = client.stream("The quick brown", long)
    got = [next(running)]  # in flight before the grace period starts
    server.refuse_new()  # what `rapid serve` does on SIGTERM before its grace period
    with pytest.raises(ServerError, match="shutting down"):
        client.generate("Paris is", GREEDY)
    got += list(running)
    assert got[-1].finished and got[-1].finish_reason == "length"
    assert sum(len(d.new_token_ids) for d in got) == 40


def test_cancel_stops_a_stream(server, client, aborts):
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    deltas = []
    for d in client.stream("Once upon", long):
        if not deltas:
            client.cancel(d.client_request_id)
        deltas.append(d)
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert sum(len(d.new_token_ids) for d in deltas) < 400
    # breaking out of a stream cancels too
    assert len(aborts) == 1
    for _ in client.stream("Once upon", long):
        break
    wait_until(lambda: server.num_active == 0)
    assert len(aborts) == 2 and len(set(aborts)) == 2  # internal ids: unique, not the client's
    assert client.generate("hello", GREEDY).finish_reason == "length"


@pytest.mark.parametrize("prompt,params,match", [
    ("", GREEDY, "empty"),
    ([], GREEDY, "empty"),
    ([1, 99999], GREEDY, "99999.*vocabulary"),
    (list(range(5, 300)) * 2, GREEDY, "max_model_len"),
    ("hello", SamplingParams(max_tokens=600), "exceeds max_model_len"),
    ("hello", SamplingParams(n=2), "n=1"),
    ("hello", SamplingParams(max_tokens=2, prompt_logprobs=2), "prompt_logprobs"),  # was accepted, then dropped
])
def test_bad_input_gets_error_reply_and_server_keeps_serving(client, prompt, params, match):
    with pytest.raises(ServerError, match=match):
        client.generate(prompt, params)
    with pytest.raises(ServerError, match=match):
        list(client.stream(prompt, params))
    assert client.generate("hello", GREEDY).finish_reason == "length"


def raw_dealer(address):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    sock.connect(address)
    return sock


def decode(raw):
    return msgspec.msgpack.decode(raw, type=ServerMessage)


def recv(sock):
    """The next reply on a raw DEALER (empty frames are the server's liveness probes: skipped)."""
    while True:
        raw = sock.recv()
        if raw:
            return decode(raw)


def test_bad_params_dict_and_malformed_requests(server, client):
    sock = raw_dealer(server.address)
    enc = msgspec.msgpack.encode
    try:
        cases = [
            ({"type": "GenerateRequest", "client_request_id": "p1", "prompt": "hi", "params": {"temperature": -1}},
             "p1", "temperature"),
            ({"type": "GenerateRequest", "client_request_id": "p2", "prompt": "hi", "params": {"max_tokens": 0}},
             "p2", "max_tokens"),
            ({"type": "GenerateRequest", "client_request_id": "p3", "prompt": "hi", "params": {"top_k": "3"}},
             "p3", "invalid request: Expected `int`"),  # well formed, a bad field: not a "malformed message"
            ({"type": "GenerateRequest", "client_request_id": "p4", "prompt": "hi", "prompt_token_ids": [5]},
             "p4", "exactly one"),
            ({"type": "GenerateRequest", "client_request_id": "p5"}, "p5", "exactly one"),
            ({"type": "ChatRequest", "client_request_id": "p6", "messages": []}, "p6", "empty"),
            ({"type": "ChatRequest", "client_request_id": "p7", "messages": [{"role": 3}]}, "p7", "str"),
            ({"type": "Nope", "client_request_id": "p8"}, "p8", "Nope"),
            ({"type": "GenerateRequest", "client_request_id": "", "prompt": "hi"}, "", "non-empty"),
            ({"client_request_id": "p9"}, "p9", "type"),
            ({"type": "GenerateRequest", "client_request_id": "x" * 257, "prompt": "hi"}, "x" * 257,
             "client_request_id is longer than 256 characters"),  # it would come back in every reply
            ({"type": "CancelRequest", "client_request_id": "y" * 1000}, "y" * 1000, "longer than 256"),
        ]
        for obj, cid, match in cases:
            sock.send(enc(obj))
            reply = recv(sock)
            assert isinstance(reply, ErrorReply) and reply.client_request_id == cid, obj
            assert match in reply.message, (obj, reply.message)
        # a cancel for an unknown request is ignored; a duplicate running id is refused
        sock.send(enc(CancelRequest("nothing")))
        slow = GenerateRequest("dup", prompt="hi", params=SamplingParams(max_tokens=500, ignore_eos=True))
        sock.send(enc(slow))
        sock.send(enc(slow))
        reply = recv(sock)
        assert isinstance(reply, ErrorReply) and reply.client_request_id == "dup" and "still running" in reply.message
        sock.send(enc(CancelRequest("dup")))
        reply = recv(sock)
        assert isinstance(reply, Completion) and reply.finish_reason == "abort"
    finally:
        sock.close(linger=0)
    assert client.generate("hello", GREEDY).finish_reason == "length"


def test_garbage_bytes_crash_nothing(llm):
    rng = random.Random(0)
    valid = msgspec.msgpack.encode(GenerateRequest("g", prompt="hello", params=GREEDY))
    with serving(llm, "tcp://127.0.0.1:*") as srv:
        sock = raw_dealer(srv.address)
        try:
            junk = [os.urandom(n) for n in (0, 1, 7, 100, 5000)] + [valid[:k] for k in range(0, len(valid), 9)]
            junk += [b"\x91" * 10000 + b"\xc0", bytes(rng.randrange(256) for _ in range(300))]
            for raw in junk:
                sock.send(raw)
                reply = recv(sock)
                assert isinstance(reply, ErrorReply) and "malformed" in reply.message
            sock.send_multipart([valid, valid])  # two frames
            assert "1 frame" in recv(sock).message
            # a raw TCP peer that never speaks ZMTP properly
            host, port = srv.address.removeprefix("tcp://").rsplit(":", 1)
            for n in (3, 64, 4096):
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    s.sendall(os.urandom(n))
            sock.send(valid)
            reply = recv(sock)
            assert isinstance(reply, Completion) and reply.finish_reason == "length"
        finally:
            sock.close(linger=0)


def test_vanished_client_requests_are_aborted(server, aborts):
    sock = raw_dealer(server.address)
    sock.send(msgspec.msgpack.encode(GenerateRequest(
        "v", prompt="hi", params=SamplingParams(max_tokens=400, ignore_eos=True), stream=True)))
    recv(sock)  # the first delta: the request runs
    sock.close(linger=0)
    wait_until(lambda: server.num_active == 0)
    assert len(aborts) == 1


def test_async_client(server, aborts):
    async def main():
        async with AsyncClient(server.address, timeout_s=TIMEOUT) as c:
            a, b = await asyncio.gather(c.generate("The quick brown", GREEDY), c.generate("Paris is", GREEDY))
            deltas = [d async for d in c.stream("The quick brown", GREEDY)]
            chat = await c.chat([{"role": "user", "content": "hi"}], GREEDY)
            with pytest.raises(ServerError, match="empty"):
                await c.generate("", GREEDY)
            stream = c.stream("Once upon", SamplingParams(max_tokens=400, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()  # cancels on the server
            wait_until(lambda: len(aborts) == 1)
            return a, b, deltas, chat

    a, b, deltas, chat = asyncio.run(main())
    assert a.text != b.text and len(a.token_ids) == 10
    assert "".join(d.new_text for d in deltas) == a.text and deltas[-1].finished
    assert chat.finish_reason == "length"
    wait_until(lambda: server.num_active == 0)


def test_close_removes_socket_file_and_directory(llm):
    server = RapidServer(llm).start()
    path = server.address.removeprefix("ipc://")
    directory = os.path.dirname(path)
    assert os.path.exists(path) and (os.stat(directory).st_mode & 0o777) == 0o700
    with Client(server.address, timeout_s=TIMEOUT) as c:
        assert c.generate("hello", GREEDY).finish_reason == "length"
        it = c.stream("Once upon", SamplingParams(max_tokens=400, ignore_eos=True))
        next(it)
        server.close()  # in flight: the client is told, the engine drained
        with pytest.raises(ServerError, match="shutting down"):
            list(it)
    assert not os.path.exists(path) and not os.path.exists(directory)
    assert not llm.engine.get_stats().num_requests
    server.close()  # idempotent


def test_an_idle_client_reaches_a_restarted_server(llm, tmp_path):
    """The server goes away and comes back at the same address while the clients are idle: their next request goes
    to the new server and is answered (the disconnect they had not read yet used to end it, a ServerError), for a
    Client and for an AsyncClient driven by one asyncio.run per call."""
    address = f"ipc://{tmp_path}/restarted.sock"
    with Client(address, timeout_s=TIMEOUT) as c:
        aclient = AsyncClient(address, timeout_s=TIMEOUT)
        for _ in range(2):  # the first server, then the restarted one
            with serving(llm, address):
                assert c.generate("hello", GREEDY).finish_reason == "length"
                assert asyncio.run(aclient.generate("hello", GREEDY)).finish_reason == "length"
                assert c.generate("hello", GREEDY).finish_reason == "length"
        asyncio.run(aclient.close())


def test_explicit_ipc_address_and_address_checks(llm, tmp_path):
    path = tmp_path / "my.sock"
    with serving(llm, f"ipc://{path}") as srv, Client(srv.address, timeout_s=TIMEOUT) as c:
        assert c.generate([5, 6, 7], GREEDY).finish_reason == "length"
    assert not path.exists()
    for ok in ("tcp://127.0.0.1:5555", "tcp://localhost:*", "tcp://[::1]:80", "ipc:///tmp/x.sock"):
        check_address(ok)
    for bad in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:1", "tcp://example.com:1"):
        with pytest.raises(ValueError, match="allow_remote"):
            check_address(bad)
        check_address(bad, allow_remote=True)
    for bad in ("inproc://x", "udp://127.0.0.1:1", "tcp://127.0.0.1", "ipc://", "127.0.0.1:5"):
        with pytest.raises(ValueError):
            check_address(bad)
    with pytest.raises(ValueError, match="allow_remote"):
        RapidServer(llm, "tcp://0.0.0.0:0")


def test_cli_serve_until_sigterm(tiny_llama):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-m", "rapid.entrypoints.cli", "serve", "--model", str(tiny_llama),
                             "--no-http", "--shutdown-grace-s", "0"],
                            cwd=Path(__file__).parents[1], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        address = line.rsplit(" at ", 1)[1].strip()
        with Client(address, timeout_s=TIMEOUT) as c:
            assert c.generate("hello", GREEDY).finish_reason == "length"
            it = c.stream("Once upon", SamplingParams(max_tokens=400, ignore_eos=True))
            next(it)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ServerError, match="shutting down"):
                list(it)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped" in proc.stdout.read()
    assert not os.path.exists(os.path.dirname(address.removeprefix("ipc://")))


def test_cancel_then_reuse_the_id(server):
    """A client id is free again as soon as its request is cancelled; no reply shows an internal id."""
    sock = raw_dealer(server.address)
    enc = msgspec.msgpack.encode
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    try:
        for _ in range(3):
            sock.send(enc(GenerateRequest("r", prompt="Once upon", params=long, stream=True)))
            assert isinstance(recv(sock), Delta)  # running
            sock.send(enc(CancelRequest("r")))
            sock.send(enc(GenerateRequest("r", prompt="hello", params=GREEDY)))
            while True:  # the old stream's remaining deltas may come first; then the new request's Completion
                reply = recv(sock)
                assert not isinstance(reply, ErrorReply), reply.message
                if isinstance(reply, Completion):
                    break
            assert reply.client_request_id == "r" and reply.finish_reason == "length" and len(reply.token_ids) == 10
        sock.send(enc(GenerateRequest("e", prompt_token_ids=[1, 99999], params=GREEDY)))
        reply = recv(sock)
        assert isinstance(reply, ErrorReply) and "zmq-" not in reply.message and "99999" in reply.message
    finally:
        sock.close(linger=0)
    wait_until(lambda: server.num_active == 0)


def test_misspelt_fields_are_refused_by_name(server, client):
    sock = raw_dealer(server.address)
    enc = msgspec.msgpack.encode
    try:
        for cid, obj, name in [
            ("m1", {"params": {"max_token": 5}}, "max_token"),
            ("m2", {"promt_token_ids": [5, 6]}, "promt_token_ids"),
            ("m3", {"streaming": True}, "streaming"),
        ]:
            sock.send(enc({"type": "GenerateRequest", "client_request_id": cid, "prompt": "hi", **obj}))
            reply = recv(sock)
            assert isinstance(reply, ErrorReply) and reply.client_request_id == cid and name in reply.message
        sock.send(enc({"type": "CancelRequest", "client_request_id": "x", "reason": "bored"}))
        assert "reason" in recv(sock).message
    finally:
        sock.close(linger=0)
    with pytest.raises(TypeError, match="max_token"):  # the Python client refuses before sending
        client.generate("hi", {"max_token": 5})


def test_second_server_on_a_live_ipc_path_is_refused(llm, tmp_path):
    from rapid.entrypoints.server import AddressInUseError

    path = tmp_path / "one.sock"
    with serving(llm, f"ipc://{path}") as first:
        inode = path.stat().st_ino
        with pytest.raises(AddressInUseError, match=r"in use.*another RapidServer \(pid \d+\)"):
            RapidServer(llm, f"ipc://{path}")
        assert path.stat().st_ino == inode  # not taken over, not deleted
        with Client(first.address, timeout_s=TIMEOUT) as c:
            assert c.generate("hello", GREEDY).finish_reason == "length"
        # a listener that is not a RapidServer is not taken over either
        other = tmp_path / "other.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(other))
        listener.listen()
        with pytest.raises(AddressInUseError, match="a program listens"):
            RapidServer(llm, f"ipc://{other}")
        listener.close()
        # a stale socket file (its server was killed: nobody listens) is replaced
        with serving(llm, f"ipc://{other}") as second, Client(second.address, timeout_s=TIMEOUT) as c:
            assert c.generate("hello", GREEDY).finish_reason == "length"
        assert not other.exists()
    assert not path.exists() and not (tmp_path / "one.sock.lock").exists()
    with serving(llm, "tcp://127.0.0.1:*") as first:
        with pytest.raises(AddressInUseError, match="in use"):
            RapidServer(llm, first.address)


def test_close_leaves_a_socket_file_that_is_not_its_own(llm, tmp_path):
    path = tmp_path / "s.sock"
    server = RapidServer(llm, f"ipc://{path}").start()
    try:
        os.rename(path, tmp_path / "moved.sock")  # someone replaced the file while the server ran
        impostor = socket.socket(socket.AF_UNIX)
        impostor.bind(str(path))
        impostor.close()
    finally:
        server.close()
    assert path.exists()  # not its own: left alone


def test_limits_are_checked_at_the_edge(llm):
    from rapid.entrypoints.server import ServerLimits

    with pytest.raises(ValueError, match="max_frame_bytes must be > 0, got 0"):
        ServerLimits(max_frame_bytes=0)
    with pytest.raises(ValueError, match=r"max_queued_bytes_per_client \(1000\) must be >= max_frame_bytes"):
        ServerLimits(max_queued_bytes_per_client=1000)
    with pytest.raises(TypeError, match="ServerLimits"):
        RapidServer(llm, limits={"max_frame_bytes": 5})


def test_shared_frontend_stays_open_after_close(llm):
    from rapid.entrypoints.frontend import EngineFrontend

    frontend = EngineFrontend(llm)
    try:
        server = RapidServer(llm, frontend=frontend).start()
        with Client(server.address, timeout_s=TIMEOUT) as c:
            assert c.generate("hello", GREEDY).finish_reason == "length"
            it = c.stream("Once upon", SamplingParams(max_tokens=400, ignore_eos=True))
            next(it)
            server.close()  # its requests end; the frontend keeps serving others
            with pytest.raises(ServerError, match="shutting down"):
                list(it)
        assert frontend.num_pending == 0 and frontend.dead_reason is None
        done = threading.Event()
        frontend.submit("other", [5, 6, 7], GREEDY, lambda d: d.finished and done.set())
        assert done.wait(TIMEOUT)
    finally:
        frontend.close()


def test_a_client_used_by_a_second_thread_at_once_says_so(server):
    """A Client serves one thread at a time: a request from another thread while a stream is open raises a
    RuntimeError at once (it used to lose replies and hang); once the stream is done, that thread may use it."""
    with Client(server.address, timeout_s=TIMEOUT) as c:
        stream = c.stream("Once upon", SamplingParams(max_tokens=40, ignore_eos=True))
        next(stream)
        errors: list[BaseException] = []

        def other():
            try:
                c.generate("hello", GREEDY)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join(TIMEOUT)
        assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "another thread" in str(errors[0])
        assert sum(1 for _ in stream) > 0  # the first thread's stream is whole
        done: list = []
        t = threading.Thread(target=lambda: done.append(c.generate("hello", GREEDY).finish_reason))
        t.start()
        t.join(TIMEOUT)
        assert done == ["length"]


def test_a_client_address_that_no_server_can_have_is_a_value_error():
    from rapid.client import AsyncClient

    for bad in ("foo://bar", "localhost:5555", "inproc://x"):
        with pytest.raises(ValueError, match="ipc://<path> or tcp://<host>:<port>"):
            Client(bad)  # (it was a raw ZMQError, or an endless wait for inproc://)
        with pytest.raises(ValueError, match="ipc://<path> or tcp://<host>:<port>"):
            AsyncClient(bad)
