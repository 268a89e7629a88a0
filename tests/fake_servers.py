"""Tracking servers that misbehave, for the bad-input suite: one that accepts connections and never
answers (a hung server, a firewall that swallows the request)."""

from __future__ import annotations

import socket

_OPEN: list[socket.socket] = []  # kept open (listening) until the test process ends


def silent_server_port() -> int:
    """A port on 127.0.0.1 that accepts TCP connections (the kernel completes them from the listen
    backlog) and never reads or answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    _OPEN.append(server)
    return server.getsockname()[1]
