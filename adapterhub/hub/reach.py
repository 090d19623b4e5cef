"""The Hub endpoint, and whether it can be reached at all, asked once before anything is fetched from it.

huggingface_hub retries a refused connection or a failed DNS lookup five times with backoff, about
23 s per file and several files per model, although neither heals by waiting. So before the first
fetch adapterhub tries one TCP connection to the endpoint; when the name does not resolve or the
connection is refused, huggingface_hub, transformers and datasets are switched to offline mode for the
rest of the process: files already in the cache still load, and a missing one fails at once. A
connection that times out may be a slow network, so it is left to the libraries' own retries.

``HF_ENDPOINT`` is read at call time here and passed explicitly where a function takes it, because
huggingface_hub freezes it when first imported.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_offline_because: str | None = None  # set when this process switched the libraries offline


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def offline_by_choice() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


@functools.cache
def unreachable_reason(address: str) -> str | None:
    """Why the endpoint at URL ``address`` cannot be reached at all (a name that does not resolve, a
    refused connection); ``None`` when it answered, when it may only be slow, or when a proxy stands
    between (only the proxy knows)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    url = urlsplit(address)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return f"the name {host} does not resolve"
    family, kind, proto, _, socket_address = addresses[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(PROBE_TIMEOUT_S)
            probe.connect(socket_address)
    except ConnectionRefusedError:
        return f"connection to {host}:{port} refused"
    except OSError as err:
        if isinstance(err, TimeoutError):
            return None
        return f"{host}:{port}: {err.strerror or type(err).__name__}"
    return None


def go_offline_if_unreachable() -> str | None:
    """Switch the Hub libraries to their offline mode when the Hub cannot be reached; return why, or None."""
    global _offline_because
    if _offline_because is not None or offline_by_choice():
        return _offline_because
    reason = unreachable_reason(endpoint())
    if reason is None:
        return None
    _offline_because = reason
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries not imported yet: they read it at import
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True  # transformers asks huggingface_hub at call time
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    return reason


def unreachable_hint() -> str | None:
    """For an error about a missing Hub file: that the Hub could not be reached, if so; else None."""
    if _offline_because is None:
        return None
    return f"the Hub at {endpoint()} cannot be reached ({_offline_because}) and it is not in the local cache"
