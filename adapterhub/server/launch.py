"""What ``adapterhub serve`` does: parse adapter specs, pick the base model, run uvicorn over an Engine.

The engine outlives uvicorn on purpose: on SIGTERM uvicorn stops accepting connections and waits
for the requests in flight (up to the grace period), and only then is the engine stopped.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterhub.errors import UserError
from adapterhub.hub.specs import AdapterSpec, default_name, infer_base
from adapterhub.server.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_CAP,
    DEFAULT_READ_TIMEOUT_S,
)

if TYPE_CHECKING:
    from rich.console import Console

    from adapterhub.runtime.engine import Engine

ALIAS_PATTERN = re.compile(r"^[^=\s,]+$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    adapters: list[AdapterSpec]
    base: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    quantization: str = "auto"
    device: str = "auto"
    api_key: str | None = None
    max_adapters: int = 8
    max_queue: int = DEFAULT_MAX_QUEUE
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    grace_s: float = 30.0
    strict_base: bool = False
    allow_runtime_loading: bool = False
    adapter_roots: tuple[str, ...] = ()
    allow_hub_pulls: bool = False
    admin_api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S


def parse_adapter_specs(text: str) -> list[AdapterSpec]:
    """``a,b=path,c=org/repo@v1``: each item a spec, optionally ``alias=spec``; names must be unique."""
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if "=" in item:
            name, _, spec = (part.strip() for part in item.partition("="))
        else:
            name, spec = default_name(item), item
        if not name or not spec or not ALIAS_PATTERN.match(name):
            raise UserError(
                f"adapter '{item}' is not 'SPEC' or 'ALIAS=SPEC': write e.g. --adapters sql=org/sql-lora"
            )
        specs.append(AdapterSpec(name, spec))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(
            f"adapter name '{repeated[0]}' is given twice: give each one an alias, e.g. NAME2=SPEC"
        )
    return specs


def build_engine(options: ServeOptions, console: Console | None = None) -> Engine:
    """The engine ``options`` describe, with every adapter registered (not started yet)."""
    from rich.progress import Progress

    from adapterhub.runtime.engine import Engine, EngineConfig

    base = infer_base(options.adapters, options.base)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"loading {base}", total=len(options.adapters) + 1)
        engine = Engine(
            EngineConfig(
                base=base,
                quantization=options.quantization,
                device=options.device,
                max_adapters=options.max_adapters,
                max_queue=options.max_queue,
                strict_base=options.strict_base,
            )
        )
        for adapter in options.adapters:
            progress.update(task, advance=1, description=f"loading adapter {adapter.name}")
            engine.register(adapter.name, adapter.spec)
    return engine


def serve(options: ServeOptions) -> None:
    """Load the base and adapters, then serve until SIGINT/SIGTERM; in-flight requests get ``grace_s``."""
    import uvicorn
    from rich.console import Console

    from adapterhub.server.app import create_app
    from adapterhub.server.http_server import AdapterServer, header_timeout_protocol
    from adapterhub.server.loading_policy import LoadingPolicy

    console = Console(stderr=True)
    loading = LoadingPolicy.from_options(
        options.allow_runtime_loading, options.adapter_roots, options.allow_hub_pulls, options.admin_api_key
    )
    engine = build_engine(options, console)
    app = create_app(
        engine,
        api_key=options.api_key,
        max_queue=options.max_queue,
        max_tokens_cap=options.max_tokens_cap,
        max_body_bytes=options.max_body_bytes,
        loading=loading,
        allowed_hosts=options.allowed_hosts,
        read_timeout_s=options.read_timeout_s,
    )
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        http=header_timeout_protocol(options.read_timeout_s),
    )
    engine.start()
    url = f"http://{options.host}:{options.port}/v1"
    message = f"serving {engine.base_name} with {len(options.adapters)} adapter(s) on {url}"
    console.print(message, markup=False, soft_wrap=True)
    console.print(loading.describe(), markup=False, soft_wrap=True)
    if options.api_key is None and options.host not in LOOPBACK_HOSTS:
        console.print(f"warning: {options.host} is reachable from other machines and no --api-key is set")
    if loading.enabled and not (loading.admin_api_key or options.api_key):
        console.print("warning: runtime loading is on with no key: any client can load and unload adapters")
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to its previous handler:
    # ours turns it into an exception so the engine is stopped and the process exits 0.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        AdapterServer(config, app.state.drain, options.grace_s).run()
    except _Terminated:
        console.print(f"SIGTERM: {app.state.drain.summary(options.grace_s)}", markup=False, soft_wrap=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop(options.grace_s)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated
