"""Connection limits uvicorn does not have: a request read timeout and a cap on open sockets.

uvicorn closes idle keep-alive connections but waits forever for a request that is being sent:
a client that sends headers and half a body, then nothing, holds its socket (and, by the
hundreds, the process's file descriptors) for good. ``guarded_h11`` returns uvicorn's h11
protocol with three changes:

- a request (headers and body) must arrive within ``read_timeout`` seconds of its first byte
  (or of the connection opening, or of the previous response's end for a request pipelined
  behind it); otherwise the client gets 408 and the socket is closed, and the app, if it was
  reading the body, sees a disconnect;
- with ``max_connections`` sockets open, a new one is answered 503 and closed at once;
- a request h11 cannot parse (bad Content-Length, malformed headers) gets our JSON error body
  instead of uvicorn's plain text.
"""

from __future__ import annotations

import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ecospa_deploy.serve.errors import error_body

log = logging.getLogger("ecospa_deploy.serve")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}
_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


def raw_error(status: int, message: str, code: str | None = None) -> bytes:
    """A complete HTTP/1.1 response carrying an OpenAI error body, closing the connection."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)))
    return head + body


class _RefusalLog:
    """One WARNING per ``every`` seconds for refused connections, with how many it stands
    for: a flood of them must not become a flood of log lines."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last, self.suppressed = every, float("-inf"), 0

    def note(self, open_: int, limit: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more refused since the last warning)" \
            if self.suppressed else ""
        log.warning("refusing a connection: %d are open (--max-connections %d)%s", open_,
                    limit, more)
        self.last, self.suppressed = now, 0


_refusals = _RefusalLog()


class GuardedH11Protocol(H11Protocol):
    """See the module docstring; configured by ``guarded_h11``."""

    read_timeout: float = 30.0
    max_connections: int = 1000

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._read_timer = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            _refusals.note(len(self.connections) - 1, self.max_connections)
            self._reject(503, f"the server has {self.max_connections} open connections "
                         "(--max-connections); retry later", "too_many_connections")
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state not in _RECEIVED:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in _RECEIVED:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A request pipelined behind the one just answered arrived in an earlier read, so
        # data_received will not see its first byte: its clock starts now.
        if (self._read_timer is None and not self.transport.is_closing()
                and self.conn.their_state not in _RECEIVED
                and (self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0])):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "invalid HTTP request (a malformed request line, header or "
                     "Content-Length)")

    # -- internals ----------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or self.conn.their_state in _RECEIVED:
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        self._reject(408, f"the request was not received within {self.read_timeout:g} s "
                     "(--read-timeout)", "timeout")

    def _reject(self, status: int, message: str, code: str | None = None) -> None:
        cycle = self.cycle
        if cycle is not None:  # the app may be waiting for the body: it sees a disconnect
            cycle.disconnected = True
            cycle.message_event.set()
        if not self.transport.is_closing():
            self.transport.write(raw_error(status, message, code))
            self.transport.close()


def guarded_h11(read_timeout: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout": read_timeout, "max_connections": max_connections})
