"""A ZeroMQ socket's disconnect monitor, opened and closed so that it can never stall the context's I/O thread.

libzmq's I/O thread sends each monitor event with a blocking send. Two ways to hang it, and with it every socket of
the context (for a client, usually the process-wide zmq.Context.instance()):
  - the queue of unread events is full: the reader here takes any number of events (RCVHWM 0);
  - the reader is closed while the socket still reports: `close_monitored` stops the monitor first.
"""

from __future__ import annotations

import uuid

import zmq


def open_disconnect_monitor(sock: zmq.Socket, events: int = zmq.EVENT_DISCONNECTED) -> zmq.Socket:
    """A PAIR socket that gets a message each time a connection of `sock` closes (or another of `events`)."""
    name = f"inproc://rapid-monitor-{uuid.uuid4().hex}"  # own name: pyzmq's default (the fd) can still be bound
    sock.monitor(name, events)
    reader = sock.context.socket(zmq.PAIR)
    reader.setsockopt(zmq.LINGER, 0)
    reader.setsockopt(zmq.RCVHWM, 0)  # before connect: the inproc pipe's limit is set then
    reader.connect(name)
    return reader


def close_monitored(sock: zmq.Socket, reader: zmq.Socket | None, linger_ms: int = 0) -> None:
    """Stop `sock`'s monitor, then close its reader and the socket itself."""
    if reader is not None:
        sock.disable_monitor()  # synchronous: no event is sent after this returns
        reader.close(linger=0)
    sock.close(linger=linger_ms)
