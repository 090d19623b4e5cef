"""HTTP helpers of the server tests."""

from __future__ import annotations

import http.client
import json


class KeepAlive:
    """One HTTP/1.1 connection, checked to still be the same socket after every exchange."""

    def __init__(self, url: str) -> None:
        self.connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        self.connection.connect()
        self.port = self.connection.sock.getsockname()[1]

    def send(self, method: str, path: str, body: str | bytes | None = None) -> tuple[int, dict, object]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        assert self.connection.sock is not None, "the server closed the connection"
        assert self.connection.sock.getsockname()[1] == self.port
        content_type = response.getheader("content-type", "")
        parsed = json.loads(payload) if content_type.startswith("application/json") else payload.decode()
        return response.status, dict(response.getheaders()), parsed

    def close(self) -> None:
        self.connection.close()
