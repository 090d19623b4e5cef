"""How adapterhub runs uvicorn: clients get a deadline for their headers, and a shutdown ends every
request with a proper answer.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the requests in flight.
``AdapterServer`` gives them ``grace_s``; then ``Drain`` cancels what is left, so a non-streamed
request gets a 503 ``cancelled`` body and a stream an SSE error event and ``[DONE]`` instead of a
cut connection, and the log can say how many finished and how many were cancelled.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from adapterhub.server.errors import error_body

if TYPE_CHECKING:
    from adapterhub.server.bridge import Generations

CANCEL_MARGIN_S = 10  # after the grace: time for cancelled requests to write their error answers
SHUTDOWN_MESSAGE = "the server is shutting down and its grace period is over: retry the request"


class Drain:
    """The work in flight that a shutdown has to finish or cancel (generations and Hub pulls), and
    how each piece ended, as its client saw it."""

    def __init__(self) -> None:
        self.generations: set[Generations] = set()
        self.pulls: set[threading.Event] = set()
        self.draining = False
        self.at_signal = 0  # requests in flight when the shutdown began
        self.finished = 0  # of those, answered in full
        self.cancelled = 0  # of those, answered "cancelled" once the grace was over

    def begin(self) -> None:
        self.draining = True
        self.at_signal = len(self.generations) + len(self.pulls)

    def cancel_remaining(self) -> None:
        """The grace is over: cancel every generation and pull still running."""
        for generations in list(self.generations):
            generations.cancel(SHUTDOWN_MESSAGE)
        for pull in list(self.pulls):
            pull.set()

    def ended(self, *, cancelled: bool) -> None:
        """One request in flight ended: with its answer, or cancelled by the shutdown."""
        if self.draining:
            if cancelled:
                self.cancelled += 1
            else:
                self.finished += 1

    def summary(self, grace_s: float) -> str:
        """What the shutdown did, for the log line."""
        parts = [f"{self.finished} in-flight request(s) finished"]
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled after the {grace_s:g} s grace")
        cut = self.at_signal - self.finished - self.cancelled
        if cut > 0:
            parts.append(f"{cut} cut off")
        return ", ".join(parts) + "; stopping"


class AdapterServer(uvicorn.Server):
    """uvicorn's server, with the in-flight requests that outlive ``grace_s`` cancelled cleanly."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        # uvicorn's own deadline only backs ours up: past it, it cuts connections.
        config.timeout_graceful_shutdown = math.ceil(grace_s) + CANCEL_MARGIN_S
        super().__init__(config)
        self.drain, self.grace_s = drain, grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        self.drain.begin()
        timer = asyncio.get_running_loop().call_later(self.grace_s, self.drain.cancel_remaining)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not sent a request's headers within
    ``timeout_s`` of opening (or of its last response): a slow client cannot hold a connection open.

    One that sent part of a request gets a 408 first; an idle one is just closed.
    """
    body = json.dumps(
        error_body(
            408, f"the request headers did not arrive within {timeout_s:g} s: send them faster", "timeout"
        )
    ).encode()
    timeout_response = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )

    class HeaderTimeout(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _timer: asyncio.TimerHandle | None = None
        _awaited: object = None  # the request cycle in place when the timer started
        _partial = False  # bytes arrived since then

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start()

        def data_received(self, data: bytes) -> None:
            self._partial = True
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._start()  # before the next request, which a pipelining client may have sent already
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _start(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._awaited, self._partial = self.cycle, False
            self._timer = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            if self.cycle is not self._awaited or self.transport.is_closing():
                return  # a request's headers arrived in time
            if self._partial:
                self.transport.write(timeout_response)
            self.transport.close()

    return HeaderTimeout
