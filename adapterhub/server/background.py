"""Run an ASGI app on a real uvicorn server in a background thread (tests, notebooks, embedding)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from adapterhub.errors import UserError


@contextlib.contextmanager
def serve_in_background(app, *, host: str = "127.0.0.1", port: int = 0, **config) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL (``port=0`` picks a free port).

    Leaving the block runs uvicorn's graceful shutdown: in-flight requests finish first.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True, name="adapterhub-uvicorn")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UserError(
                f"the server did not start on {host}:{port}: is the port taken? pick another --port"
            )
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(60)
