"""`rapid serve`: one LLM, one EngineFrontend, the OpenAI HTTP server and the ZeroMQ server, until a signal.

Every address flag is checked before the (slow) engine start. On SIGINT / SIGTERM: new requests are refused
(503), in-flight ones get `--shutdown-grace-s` to finish and are then aborted (each still ends with a final
message), the servers stop, the engine shuts down, and the process exits 0. A second signal ends the in-flight
requests at once (each with its final message) and exits the same way; a third acts as usual.
A signal while the engine starts cuts the start short (its clean-up runs): nothing is served, the exit is 0.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import logging
import os
import signal
import socket
import time

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The serve flags (the engine flags are added by the caller)."""
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s; others need "
                   "--allow-remote and --api-key)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port, 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (HTTP)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model name(s) clients send; the first is the one responses report (default: the model "
                        "folder)")
    p.add_argument("--address", default=None, help="ZeroMQ endpoint (default ipc:// in a private directory, printed)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback HTTP host (with --api-key) or tcp:// ZeroMQ address (no authentication!)")
    p.add_argument("--no-http", dest="http", action="store_false", help="do not start the HTTP server")
    p.add_argument("--no-zmq", dest="zmq", action="store_false", help="do not start the ZeroMQ server")
    p.add_argument("--max-pending", type=int, default=4096, help="requests in flight before 429 (default: %(default)s)")
    p.add_argument("--shutdown-grace-s", type=float, default=5.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests may finish before they are aborted; a "
                        "second signal aborts them at once (default: %(default)s)")
    p.add_argument("--allowed-origins", nargs="+", default=None,
                   help="browser origins CORS lets call the HTTP API, '*' for any (default: none, no CORS headers)")
    p.add_argument("--chat-template", default=None,
                   help="chat template for /v1/chat/completions, a file or the Jinja text itself (default: the "
                        "tokenizer's)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a request bring its own chat_template, which wins over the server's (default: such a "
                        "request is refused with a 400, as vLLM: a template is a program the server runs)")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request the HTTP server receives: its id, prompt length in tokens and sampling "
                        "parameters (at INFO, shown whatever --log-level)")
    p.add_argument("--disable-log-requests", dest="enable_log_requests", action="store_false",
                   help="vLLM's deprecated flag: do not log requests (the default)")


def with_model_tag(args: argparse.Namespace) -> argparse.Namespace:
    """`rapid serve MODEL` as `vllm serve MODEL`: the positional model is --model (ValueError if both differ)."""
    tag = getattr(args, "model_tag", None)
    names = getattr(args, "served_model_name", None) or []
    if tag is None and args.model is None and len(names) > 1 and os.path.exists(names[-1]):
        raise ValueError(f"--served-model-name took the model {names[-1]!r} as a name (it takes every word after "
                         f"it): give the model first, `rapid serve {names[-1]} --served-model-name "
                         f"{' '.join(names[:-1])}`, or as --model")
    if tag is None:
        return args
    if args.model is not None and args.model != tag:
        raise ValueError(f"the model is given twice, as {tag!r} and --model {args.model!r}; give one")
    return argparse.Namespace(**vars(args) | {"model": tag})


def read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the value itself when it is no file (as vllm serve); ValueError for a
    value that is neither (no such file, and no Jinja in it: a mistyped path)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" not in value and "{%" not in value:
        raise ValueError(f"--chat-template {value!r} is no file, and no Jinja template text ({{{{ or {{%) either")
    return value

def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int, flag: str | None = None) -> None:
    """ValueError now, not after the model loaded, when something already listens on host:port (port 0: any).
    `flag`: the flag that named it (default: --port)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return  # an unresolvable host: uvicorn names it when it binds
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            busy = (f"--port {port} on {host} is in use ({e.strerror}); choose another --port, or --no-http"
                    if flag is None else f"{flag} is in use ({e.strerror}); choose another")
            raise ValueError(busy) from None


def check_serve_args(args: argparse.Namespace) -> None:
    """ValueError for any bad address, host, port or key flag (before the engine is built)."""
    from rapid.entrypoints.server import check_address
    from rapid.entrypoints.zmq_endpoint import check_ipc_free

    if not (args.http or args.zmq):
        raise ValueError("--no-http and --no-zmq together leave nothing to serve")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty; give a secret or leave the flag out")
    if args.http:
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        if not _is_loopback(args.host) and not (args.allow_remote and args.api_key):
            raise ValueError(f"--host {args.host} is not a loopback address: anyone who can reach it could use the "
                             "model. Pass both --allow-remote and --api-key to bind it.")
        _check_port_free(args.host, args.port)
    if args.zmq and args.address is not None:
        check_address(args.address, args.allow_remote)
        if args.address.startswith("tcp://"):  # as --port: found taken now, not after the model loaded
            host, _, port = args.address.removeprefix("tcp://").rpartition(":")
            if port.isdigit():
                _check_port_free(host, int(port), f"--address {args.address}")
        else:
            check_ipc_free(args.address)
    if args.max_pending < 1:
        raise ValueError(f"--max-pending must be >= 1, got {args.max_pending}")
    if not args.shutdown_grace_s >= 0:
        raise ValueError(f"--shutdown-grace-s must be >= 0, got {args.shutdown_grace_s}")
    read_chat_template(getattr(args, "chat_template", None))


def _zmq_server(llm, frontend, args):
    """RapidServer over the shared frontend, or None when this RapidServer cannot share one (it would drive the
    engine from a second thread) while HTTP is on."""
    from rapid.entrypoints.server import RapidServer

    if "frontend" in inspect.signature(RapidServer).parameters:
        return RapidServer(llm, args.address, allow_remote=args.allow_remote, frontend=frontend).start()
    if args.http:
        logger.warning("this RapidServer cannot share the engine with the HTTP server; ZeroMQ is off "
                       "(use --no-http to serve ZeroMQ alone)")
        return None
    return RapidServer(llm, args.address, allow_remote=args.allow_remote).start()


class StoppedDuringStart(BaseException):
    """SIGINT / SIGTERM while the engine starts (a BaseException: the start's own clean-up runs and re-raises)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum} during the engine start")
        self.signum = signum


def serve(args: argparse.Namespace) -> None:
    """Check the flags, build the engine and servers, print the addresses, serve until SIGINT / SIGTERM."""
    from rapid.config import EngineArgs
    from rapid.entrypoints.llm import LLM

    check_serve_args(args)
    engine_args = EngineArgs.from_cli_args(with_model_tag(args))
    # signals so far, a plain counter: Event.set in the handler could wait on the lock Event.wait holds in this
    # thread. 1: drain (new requests refused, those in flight finish within --shutdown-grace-s); 2: stop now (those
    # in flight end with finish_reason 'abort'); a third acts as usual.
    stop = [0]
    started = []  # the LLM, once started
    previous = {}

    def on_signal(signum, _frame):
        stop[0] += 1
        # at once (attribute writes only): a child killed with the owner (systemd's SIGTERM to the group) stays dead
        for llm in started:
            llm.engine.stop_restarts()
        if stop[0] >= 2:
            signal.signal(signum, previous.get(signum, signal.SIG_DFL))
        if not started:  # the engine start (minutes on a GPU) is cut short: its clean-up runs, nothing is served
            raise StoppedDuringStart(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        llm = LLM.from_engine_args(engine_args)
        started.append(llm)
        with llm:
            _serve_llm(llm, args, stop)
    except StoppedDuringStart as e:
        logger.warning("signal %d during the engine start: stopped before serving", e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("RAPID server stopped", flush=True)


def _serve_llm(llm, args: argparse.Namespace, stop: list[int]) -> None:
    from rapid.entrypoints.frontend import EngineFrontend

    frontend = EngineFrontend(llm, max_pending=args.max_pending)
    http = serving = zmq = None
    try:
        if args.http:
            from rapid.entrypoints.openai.api_server import build_app
            from rapid.entrypoints.openai.http_server import HttpServer
            from rapid.entrypoints.openai.serving import request_logger

            if args.enable_log_requests and not request_logger.isEnabledFor(logging.INFO):
                request_logger.setLevel(logging.INFO)  # asked for by name: shown under --log-level WARNING too

            app = build_app(frontend, model_name=args.served_model_name, api_key=args.api_key,
                            chat_template=read_chat_template(args.chat_template), allowed_origins=args.allowed_origins,
                            log_requests=args.enable_log_requests,
                            trust_request_chat_template=args.trust_request_chat_template)
            serving = app.state.serving
            http = HttpServer(app, args.host, args.port).start()
        if args.zmq:
            zmq = _zmq_server(llm, frontend, args)
        where = [f"HTTP (OpenAI API) at {http.url}/v1"] if http else []
        where += [f"ZeroMQ at {zmq.address}"] if zmq else []
        print(f"RAPID serving {llm.config.model} ({llm.config.mode} mode): {'; '.join(where)}", flush=True)
        while not stop[0]:
            time.sleep(0.2)
        logger.info("stopping: refusing new requests, %d in flight", frontend.num_pending)
        if serving is not None:
            serving.closing = True
        if zmq is not None:
            zmq.refuse_new()
        deadline = time.monotonic() + args.shutdown_grace_s
        while frontend.num_pending and time.monotonic() < deadline and stop[0] < 2:
            time.sleep(0.05)
        if frontend.num_pending and stop[0] >= 2:
            logger.info("a second signal: ending the %d requests in flight now", frontend.num_pending)
        if serving is not None:
            serving.abort_all()  # every stream still gets its final chunk (finish_reason 'abort') and [DONE]
    finally:
        if http is not None:
            http.stop()
        if zmq is not None:
            zmq.close()
        if serving is not None:
            serving.close()
        frontend.close()
