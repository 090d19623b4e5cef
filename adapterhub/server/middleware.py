"""ASGI middleware of the server: bugs answered as 500s, the Host check, the body's size and time
limits, and per-route request metrics."""

from __future__ import annotations

import logging
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub.server.errors import error_response, internal_error_message
from adapterhub.server.metrics import ServerMetrics

logger = logging.getLogger("adapterhub.server")


class CatchBugs:
    """Answers an exception no handler took (a bug) with a 500 error body, traceback to the log.

    Starlette's own last-resort handler re-raises after answering, and uvicorn then closes the
    connection; swallowing it here keeps a keep-alive connection usable for the next request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:
            logger.exception("unexpected error answering %s %s", scope["method"], scope["path"])
            if not started:  # past the first byte nothing can be said; the response just ends
                await error_response(500, internal_error_message(err), "internal_error")(scope, receive, send)


class AllowedHosts:
    """Answers 400 to a request whose ``Host`` header is not an allowed name (``*.`` covers subdomains).

    A browser page on another site, rebound by DNS to this server's address, sends its own host name
    here: refusing it keeps such a page from driving a server that has no API key.
    """

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]) -> None:
        self.app, self.hosts = app, tuple(host.lower() for host in hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.allowed(_host_name(scope)):
            await self.app(scope, receive, send)
            return
        message = (
            f"Host '{_host_name(scope)}' is not one this server answers to: add it to --allowed-hosts "
            "or use one of its names"
        )
        await error_response(400, message, "invalid_host")(scope, receive, send)

    def allowed(self, host: str) -> bool:
        for allowed in self.hosts:
            if host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])) or allowed == "*":
                return True
        return False


def _host_name(scope: Scope) -> str:
    """The Host header without its port ("[::1]:8000" -> "::1")."""
    host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BodySizeLimit:
    """Answers 413 to a body over ``max_bytes``, and 408 to one that takes over ``timeout_s`` to
    arrive, before any route parses it."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        with anyio.move_on_after(self.timeout_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
        if deadline.cancelled_caught:
            message = f"the request body did not arrive within {self.timeout_s:g} s: send it faster"
            # The rest of the body may still come: this connection cannot carry another request.
            await error_response(408, message, "timeout", headers={"Connection": "close"})(
                scope, receive, send
            )
            return
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is over this server's limit of {self.max_bytes} bytes: send a smaller body"
        await error_response(413, message, "body_too_large")(scope, receive, send)


class RecordRequests:
    """Counts every response by route and status and times it to its last body byte."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
