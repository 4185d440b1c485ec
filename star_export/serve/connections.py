"""Connections that cannot hold the server: a header timeout, a connection cap, accept failures logged once.

uvicorn's h11 protocol times out only idle keep-alive connections after a response, and any byte cancels that
timer: a socket that never sends a request, or sends its headers a byte at a time, stays open for ever, and enough
of them exhaust the file descriptors (the event loop then logs a traceback at every accept). `GuardedH11Protocol`
closes a connection whose request headers are not complete within `header_timeout` seconds of its opening or of
its previous response, and answers a connection over `max_connections` with 429 at once (uvicorn's own
`limit_concurrency` answers 503, a server error). The body's own timeout is the app's (serve/app.py: read_body).
"""

from __future__ import annotations

import json
import logging
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("star_export.serve")
FD_RESERVE = 64  # descriptors kept free for the engine's files, the thread pools and the listening socket


def _too_many(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": f"the server holds its limit of {limit} connections (--max-connections): retry shortly",
                "type": "rate_limit_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    max_connections: int = 1024
    on_refused = staticmethod(lambda status: None)  # counts what the guard answered or closed (metrics)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = None
        if len(self.connections) > self.max_connections:
            transport.write(_too_many(self.max_connections))
            transport.close()
            self.on_refused("connection_limit")
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if (
            self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        ):  # no complete request line and headers
            self.transport.close()
            self.on_refused("header_timeout")

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in: the body's time is the app's to judge

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers, on a kept-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float, max_connections: int, on_refused=None) -> type[GuardedH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits."""
    attrs = {"header_timeout": header_timeout, "max_connections": max_connections}
    if on_refused is not None:
        attrs["on_refused"] = staticmethod(on_refused)
    return type("GuardedH11Protocol", (GuardedH11Protocol,), attrs)


def connection_capacity() -> int:
    """Connections this process can hold: its file-descriptor limit, raised to the hard limit, less what it uses and
    `FD_RESERVE`."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    return int(soft) - in_use - FD_RESERVE


class AcceptErrors:
    """An event-loop exception handler that logs a failing accept() (EMFILE, ENFILE, ENOBUFS) once per episode, not
    at every retry; everything else goes to the loop's default handler."""

    def __init__(self):
        self.count = 0

    def __call__(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
            self.count += 1
            if self.count == 1:
                log.error(
                    "star-serve: cannot accept connections (%s): raise the file-descriptor limit (ulimit -n) or lower "
                    "--max-connections; further accept failures are counted, not logged",
                    exc.strerror or exc,
                )
            return
        loop.default_exception_handler(context)
