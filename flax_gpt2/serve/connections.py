"""Connection limits in front of uvicorn: nobody holds a socket without sending a request.

uvicorn closes a kept-alive connection that stays idle (`timeout_keep_alive`), but a connection that never
sends a request, or sends its head a byte at a time, stays open for ever; enough of them exhaust the
process's file descriptors, and then every request fails. `limited_protocol` returns uvicorn's h11
protocol with two more limits:

- a request head (request line and headers) must arrive whole within `header_timeout_s` of the
  connection's first moment (or, on a kept-alive connection, of the next request's first byte); else the
  connection is closed (with a 408 when part of a head came);
- at most `max_connections` connections are open at once; one more is answered 503 and closed at once,
  so that a flood costs a descriptor only for a moment. The default cap (`connection_cap`) is half of the
  open-file limit, at most 1000, so client sockets never take the descriptors the server itself needs.

Refusals and timeouts are logged, the first at once and the rest as one count per `LOG_INTERVAL_S`. A
request body that trickles is the app's to bound (`api.read_json`'s `--body_timeout`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource

from uvicorn.protocols.http.h11_impl import H11Protocol

from flax_gpt2.utils.cli import UsageError

log = logging.getLogger("flax_gpt2.serve")

LOG_INTERVAL_S = 10.0
# File descriptors kept for everything but client connections (the model's files, logs, JAX's runtime).
RESERVED_FILES = 64


def connection_cap(requested: int | None) -> int:
    """`--max_connections`, or its default; raises the open-file limit (soft, up to the hard one) when the
    cap needs it, so that client sockets can never use up the descriptors the server itself needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested is None:
        return max(1, min(1000, soft // 2))
    needed = requested + RESERVED_FILES
    if needed > soft:
        if hard != resource.RLIM_INFINITY and needed > hard:
            raise UsageError(f"--max_connections {requested} needs {needed} open files, more than this process "
                             f"may open (ulimit -Hn = {hard}); lower it or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return requested


def _raw_response(status: str, message: str, code: str, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with an OpenAI-shaped JSON error body."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status.startswith("5") else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode("ascii") + body


class _Throttled:
    """Logs the first of a kind of event at once, then the ones that follow as one count per interval."""

    def __init__(self, message: str):
        self.message = message
        self.pending = 0
        self.window: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, detail: str) -> None:
        if self.window is None:
            log.warning("%s (%s)", self.message, detail)
            self.window = loop.call_later(LOG_INTERVAL_S, self._flush)
        else:
            self.pending += 1

    def _flush(self) -> None:
        self.window = None
        if self.pending:
            log.warning("%s: %d more in the last %g s", self.message, self.pending, LOG_INTERVAL_S)
            self.pending = 0


def limited_protocol(*, header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with the head deadline and the connection cap (see the module)."""
    refused = _Throttled(f"refused a connection: {max_connections} are open (--max_connections)")
    timed_out = _Throttled(f"closed a connection that sent no complete request within {header_timeout_s:g} s "
                           f"(--header_timeout)")
    busy = _raw_response("503 Service Unavailable", f"The server has {max_connections} connections open, its "
                         f"limit; retry after a moment.", "too_many_connections", "retry-after: 1\r\n")
    too_slow = _raw_response("408 Request Timeout", f"The request head did not arrive within {header_timeout_s:g} s "
                             f"(this server's --header_timeout).", "request_timeout")

    class LimitedH11Protocol(H11Protocol):
        _refused = False
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle = None  # the request cycle current when the clock started: a new one means a head came
        _head_bytes = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                self._refused = True
                peer = transport.get_extra_info("peername")
                refused.note(self.loop, f"from {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "")
                transport.write(busy)
                transport.close()
                return
            super().connection_made(transport)
            self._start_head_clock()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return  # never registered with uvicorn
            self._stop_head_clock()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._start_head_clock()  # the first bytes of the next request on a kept-alive connection
            self._head_bytes += len(data)
            super().data_received(data)
            if self.cycle is not self._head_cycle:  # the head is complete: a request cycle started
                self._stop_head_clock()

        def _start_head_clock(self) -> None:
            self._head_cycle, self._head_bytes = self.cycle, 0
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _stop_head_clock(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.cycle is not self._head_cycle:
                return
            timed_out.note(self.loop, "from %s:%d" % self.client if self.client else "")
            if self._head_bytes:
                self.transport.write(too_slow)
            self.transport.close()

    return LimitedH11Protocol
