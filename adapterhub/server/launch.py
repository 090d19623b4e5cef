"""What ``adapterhub serve`` does: parse adapter specs, pick the base model, run uvicorn over an engine.

The port is bound first, before anything is loaded, so a taken port fails in a second rather than
after the model has loaded. The engine outlives uvicorn on purpose: on SIGTERM uvicorn stops accepting
connections and waits for the requests in flight (up to the grace period), and only then is the engine
stopped.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterhub.errors import UserError
from adapterhub.hub.specs import AdapterSpec, default_name, infer_base
from adapterhub.server.defaults import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_CAP,
    DEFAULT_READ_TIMEOUT_S,
)

if TYPE_CHECKING:
    from fastapi import FastAPI
    from rich.console import Console
    from rich.table import Table

    from adapterhub.runtime.serving import ServingEngine
    from adapterhub.server.loading_policy import LoadingPolicy

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
    max_batch_size: int = 32
    max_context: int | None = None
    max_lora_rank: int = 64
    max_queue: int = DEFAULT_MAX_QUEUE
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    grace_s: float = 30.0
    strict_base: bool = False
    served_model_name: str | None = None
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


def check_names(adapters: list[AdapterSpec], base: str) -> None:
    """Refuse an adapter named like the base: ``model=<base>`` means the base, so it would be unreachable."""
    for adapter in adapters:
        if adapter.name == base:
            alias = f"{base.rsplit('/', 1)[-1]}-adapter={adapter.spec}"
            raise UserError(
                f"adapter '{adapter.spec}' would be served as '{base}', the base model's own name, and could "
                f"never be reached: give it an alias, e.g. --adapters {alias}"
            )


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` now (uvicorn listens on it later), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise UserError(
            f"--host {host} does not resolve ({err.strerror}): use an address such as 127.0.0.1"
        ) from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need not wait
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRNOTAVAIL:
            hint = "give an address of this machine as --host"
        else:
            hint = "stop the program using it or pass another --port"
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}: {hint}") from err
    return sock


def build_engine(options: ServeOptions, console: Console | None = None) -> ServingEngine:
    """The engine ``options`` describe, with every adapter registered (not started yet)."""
    from rich.progress import Progress

    from adapterhub.runtime.backends import open_engine
    from adapterhub.runtime.serving import EngineConfig

    base = infer_base(options.adapters, options.base)
    check_names(options.adapters, base)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"loading {base}", total=len(options.adapters) + 1)
        engine = open_engine(
            EngineConfig(
                base=base,
                quantization=options.quantization,
                device=options.device,
                max_adapters=options.max_adapters,
                max_batch_size=options.max_batch_size,
                max_context=options.max_context,
                max_lora_rank=options.max_lora_rank,
                max_queue=options.max_queue,
                strict_base=options.strict_base,
            )
        )
        for adapter in options.adapters:
            progress.update(task, advance=1, description=f"loading adapter {adapter.name}")
            engine.register(adapter.name, adapter.spec)
    return engine


def loading_policy(options: ServeOptions) -> LoadingPolicy:
    """Who may load and unload adapters while serving, and from where (off unless asked for)."""
    from adapterhub.server.loading_policy import LoadingPolicy

    return LoadingPolicy.from_options(
        options.allow_runtime_loading, options.adapter_roots, options.allow_hub_pulls, options.admin_api_key
    )


def app_for(engine: ServingEngine, options: ServeOptions, loading: LoadingPolicy | None = None) -> FastAPI:
    """The OpenAI app over ``engine`` with every limit ``options`` set: one server's, or one replica's."""
    from adapterhub.server.app import create_app

    return create_app(
        engine,
        api_key=options.api_key,
        max_queue=options.max_queue,
        max_tokens_cap=options.max_tokens_cap,
        max_body_bytes=options.max_body_bytes,
        served_model_name=options.served_model_name,
        loading=loading if loading is not None else loading_policy(options),
        allowed_hosts=options.allowed_hosts,
        read_timeout_s=options.read_timeout_s,
    )


def serve(options: ServeOptions) -> None:
    """Load the base and adapters, then serve until SIGINT/SIGTERM; in-flight requests get ``grace_s``."""
    import uvicorn
    from rich.console import Console

    from adapterhub.server.http_server import AdapterServer, header_timeout_protocol
    from adapterhub.tables import print_table

    console = Console(stderr=True)
    loading = loading_policy(options)  # before the model loads: a bad --adapter-root fails at once
    sock = listen_socket(options.host, options.port)
    from adapterhub.runtime.threads import leave_compute_to_the_engine

    leave_compute_to_the_engine()  # the engine's stepping thread computes (runtime/threads.py)
    try:
        engine = build_engine(options, console)
    except BaseException:
        sock.close()
        raise
    app = app_for(engine, options, loading)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="info",
        http=header_timeout_protocol(options.read_timeout_s),
    )
    engine.start()
    host = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    print_table(served_table(engine), console)
    name = options.served_model_name or engine.base_name
    message = f"serving {name} with {len(options.adapters)} adapter(s) on {url}"
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
        AdapterServer(config, app.state.drain, options.grace_s).run(sockets=[sock])
    except _Terminated:
        console.print(f"SIGTERM: {app.state.drain.summary(options.grace_s)}", markup=False, soft_wrap=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        engine.stop(options.grace_s)


def served_table(engine: ServingEngine) -> Table:
    """What clients can put in ``model``: the base, and each adapter with its family, size and source."""
    from rich.table import Table

    table = Table(title=f"models served by the {engine.backend}", title_justify="left")
    for column in ("model", "family", "rank / virtual tokens", "source"):
        table.add_column(column)
    table.add_row(engine.base_name, "base", "", "")
    for info in engine.list():
        size = f"r={info.rank}" if info.rank else ""
        if info.num_virtual_tokens:
            size = f"{info.num_virtual_tokens} virtual tokens"
        table.add_row(info.name, info.method, size, info.source)
    return table


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated
