"""``adapterhub serve --replicas N``: today's OpenAI app on N engine replicas, on Ray Serve.

Two deployments make one Ray Serve application:

- ``EngineReplica`` (N replicas): each holds one Engine and the very app ``create_app`` builds for
  ``adapterhub serve``; a request reaches it as an HTTP envelope through a deployment handle and runs
  through that app in-process (``_run_asgi``), streamed back message by message. Every replica
  registers every adapter of the catalog (the engine's CPU tier); its ``serve.multiplexed`` loader
  puts an adapter into a device slot, and its LRU of ``--max-adapters`` entries is what Ray routes by.
- ``Router`` (one replica, the HTTP ingress): reads the ``model`` field of a completion and calls a
  replica with ``multiplexed_model_id`` set to it, so Ray Serve sends it to a replica that already
  holds that adapter when one exists (S-LoRA's and dLoRA's affinity; Ray Serve's model multiplexing).
  It owns the adapter catalog: adapter loads and unloads are applied by one replica and recorded with
  a new catalog version, which every call carries, so each replica syncs before it serves anything
  newer than it knows (and every few seconds anyway). Replicas report their Prometheus metrics to it;
  ``GET /metrics`` shows them all with a ``replica`` label.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from adapterhub.errors import UserError

if TYPE_CHECKING:
    from adapterhub.server.launch import ServeOptions

APP_NAME = "adapterhub"
ROUTER = "Router"
REPORT_INTERVAL_S = 1.0  # replicas push metrics (and catch up with the catalog) this often
STALE_AFTER_S = 10.0  # a replica silent this long is gone from /metrics (Ray replaced it)
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
REPLICA_HEADER = "x-adapterhub-replica"
SSE = "text/event-stream"


# -- the replica ----------------------------------------------------------------------------------


class EngineReplica:
    """One Engine and the OpenAI app over it; Ray Serve runs ``--replicas`` of these."""

    async def __init__(self, options: ServeOptions) -> None:
        from prometheus_client import Counter, Gauge
        from ray import serve

        from adapterhub.runtime.api import RequestError
        from adapterhub.runtime.threads import leave_compute_to_the_engine
        from adapterhub.server.launch import app_for, build_engine

        leave_compute_to_the_engine()  # the engine's stepping thread computes (runtime/threads.py)
        self.engine = build_engine(options)
        self.app = app_for(self.engine, options)
        self.grace_s = options.grace_s
        self.engine.start()
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app_name = context.app_name  # "adapterhub", or whatever `serve run` / KubeRay named it
        self.version = 0  # the catalog version this replica's adapters match
        self._sync_lock = asyncio.Lock()
        registry = self.app.state.metrics.registry
        # Affinity: a routed request that finds its adapter among this replica's is a hit; the hit
        # rate is 1 - loads / requests.
        self.adapter_requests = Counter(
            "adapterhub_replica_adapter_requests",
            "Completions routed here for an adapter.",
            registry=registry,
        )
        self.adapter_loads = Counter(
            "adapterhub_replica_adapter_loads",
            "Adapters this replica's LRU had to take in (Ray Serve multiplexing loads).",
            registry=registry,
        )
        info = Gauge("adapterhub_replica_info", "This replica's process.", ["pid"], registry=registry)
        info.labels(str(os.getpid())).set(1)
        self.catalog_version = Gauge(
            "adapterhub_replica_catalog_version",
            "The router's adapter catalog version this replica's adapters match.",
            registry=registry,
        )

        async def make_resident(name: str) -> str:
            self.adapter_loads.inc()
            # Unknown: the app answers 404; every slot busy: the engine loads it at admission.
            with contextlib.suppress(RequestError):
                await asyncio.to_thread(self.engine.make_resident, name)
            return name

        # Ray Serve's per-replica LRU of adapters, as large as the engine's device slots: what it holds
        # is what the router sends this replica (the engine itself swaps slots on its own LRU).
        self.resident = serve.multiplexed(max_num_models_per_replica=options.max_adapters)(make_resident)
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def forward(self, version: int, envelope: dict[str, Any]) -> AsyncIterator[dict | bytes]:
        """Run one HTTP request through the app: the response head (status, headers), then its body."""
        from ray import serve

        if version != self.version:  # behind the router's catalog (or the router restarted)
            await self._sync()
        model = serve.get_multiplexed_model_id()
        if model:
            self.adapter_requests.inc()
            await self.resident(model)
        async for message in _run_asgi(self.app, envelope, self.replica):
            yield message

    async def _sync(self) -> None:
        """Register and unregister adapters until this engine's match the router's catalog."""
        from ray import serve

        from adapterhub.runtime.api import RequestError

        async with self._sync_lock:
            catalog = await serve.get_deployment_handle(ROUTER, app_name=self.app_name).catalog.remote()
            if catalog["version"] == self.version:
                return
            wanted: dict[str, str] = catalog["adapters"]
            have = {info.name: info.source for info in self.engine.list()}
            for name, source in have.items():
                if wanted.get(name) != source:
                    await asyncio.to_thread(self.engine.unregister, name)
            for name, spec in wanted.items():
                if have.get(name) != spec:
                    try:
                        await asyncio.to_thread(self.engine.register, name, spec)
                    except RequestError as err:  # e.g. a path this node lacks: its requests get a 404 here
                        logging.getLogger(__name__).warning("adapter %s: %s", name, err)
            self.version = catalog["version"]
            self.catalog_version.set(self.version)

    async def _report_forever(self) -> None:
        from prometheus_client import generate_latest
        from ray import serve

        router = serve.get_deployment_handle(ROUTER, app_name=self.app_name)
        while True:
            with contextlib.suppress(Exception):  # the router restarting: report next time
                text = generate_latest(self.app.state.metrics.registry).decode()
                version = await router.report.remote(self.replica, text)
                if version != self.version:
                    await self._sync()
            await asyncio.sleep(REPORT_INTERVAL_S)

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown, after in-flight requests had their grace period.
        if hasattr(self, "_reporter"):
            self._reporter.cancel()
            self.engine.stop(self.grace_s)


async def _run_asgi(app: Any, envelope: dict[str, Any], replica: str) -> AsyncIterator[dict | bytes]:
    """Drive an ASGI app with one buffered request; yield the response head, then body chunks.

    Closed early (the client went away, Ray cancelled the call), the app sees a disconnect and its
    task is cancelled, which cancels the engine requests behind it.
    """
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": envelope["body"], "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": envelope["method"],
        "scheme": "http",
        "path": envelope["path"],
        "raw_path": envelope["path"].encode(),
        "query_string": envelope["query_string"],
        "root_path": "",
        "headers": envelope["headers"],
        "client": envelope["client"],
        "server": ("127.0.0.1", 80),
    }
    task = asyncio.get_running_loop().create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
                yield {"status": message["status"], "headers": [*headers, (REPLICA_HEADER, replica)]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    finished = True
                    return
        task.result()  # the app ended without a response: raise what it raised
    finally:
        if not finished:
            disconnected.set()
            task.cancel()


# -- the router -----------------------------------------------------------------------------------


class Router:
    """The HTTP ingress: picks replicas by adapter, owns the adapter catalog, merges metrics."""

    def __init__(self, replicas: Any, adapters: dict[str, str]) -> None:
        self.replicas = replicas
        self.adapters = dict(adapters)  # the catalog: adapter name -> spec, as every replica registers it
        self.version = 0
        self.reports: dict[str, tuple[float, str]] = {}  # replica -> (when, its metrics text)
        self._mutations = asyncio.Lock()

    def __serve_build_asgi_app__(self) -> Any:
        """The ingress app Ray Serve's HTTP proxy calls: every path and method lands in ``handle``."""
        from starlette.applications import Starlette
        from starlette.routing import Route

        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
        return Starlette(routes=[Route("/{path:path}", self.handle, methods=methods)])

    async def handle(self, request: Any) -> Any:
        scope = request.scope
        body = await request.body()
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            return self._metrics()
        change = _catalog_change(scope["method"], scope["path"], body)
        if change is None:
            return await self._forward(scope, body, _model(scope["path"], body))
        async with self._mutations:  # one load or unload at a time, each a new catalog version
            response = await self._forward(scope, body, None)
            if response.status_code < 300:
                name, spec = change
                if spec is None:
                    self.adapters.pop(name, None)
                else:
                    self.adapters[name] = spec
                self.version += 1
            return response

    def catalog(self) -> dict[str, Any]:
        return {"version": self.version, "adapters": dict(self.adapters)}

    def report(self, replica: str, metrics_text: str) -> int:
        self.reports[replica] = (time.monotonic(), metrics_text)
        return self.version

    async def _forward(self, scope: dict, body: bytes, model: str | None):
        from starlette.responses import Response, StreamingResponse

        from adapterhub.server.errors import error_body, error_response

        envelope = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            + [(b"content-length", str(len(body)).encode())],
            "body": body,
            "client": scope.get("client") or ("127.0.0.1", 0),
        }
        routed = model if model in self.adapters else ""  # the base and unknown names: any replica
        call = self.replicas.options(multiplexed_model_id=routed, stream=True).forward.remote(
            self.version, envelope
        )
        try:
            head = await call.__anext__()
        except Exception as err:  # the replica died or Ray could not reach one
            return error_response(503, _failure(err), "replica_unavailable")
        headers = dict(head["headers"])
        if headers.get("content-type", "").startswith(SSE):

            async def relay() -> AsyncIterator[bytes]:
                finished = False
                try:
                    async for chunk in call:
                        yield chunk
                    finished = True
                except Exception as err:  # mid-stream: an error event, then the end, never a hang
                    finished = True
                    event = error_body(503, _failure(err), "replica_unavailable")
                    yield f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
                finally:
                    if not finished:  # the client went away: the replica stops generating for it
                        call.cancel()

            headers.pop("content-length", None)
            return StreamingResponse(relay(), status_code=head["status"], headers=headers)
        try:
            content = b"".join([chunk async for chunk in call])
        except Exception as err:
            return error_response(503, _failure(err), "replica_unavailable")
        headers.pop("content-length", None)
        return Response(content, status_code=head["status"], headers=headers)

    def _metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from starlette.responses import Response

        now = time.monotonic()
        fresh = {replica: text for replica, (at, text) in self.reports.items() if now - at < STALE_AFTER_S}
        registry = CollectorRegistry()
        registry.register(_ReplicaMetrics(fresh))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _ReplicaMetrics:
    """Every replica's metric families merged, each sample labelled with its ``replica``."""

    def __init__(self, reports: dict[str, str]) -> None:
        self.reports = reports

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        for replica, text in sorted(self.reports.items()):
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    labels = {**sample.labels, "replica": replica}
                    into.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        yield GaugeMetricFamily(
            "adapterhub_cluster_replicas", "Replicas that reported in the last seconds.", len(self.reports)
        )
        yield from merged.values()


def _catalog_change(method: str, path: str, body: bytes) -> tuple[str, str | None] | None:
    """(name, spec) a request would load, (name, None) one it would unload; None for other requests.

    A body that does not parse changes nothing: the replica answers it with the app's own error.
    """
    data = _json(body)
    if method == "DELETE" and path.startswith("/v1/adapters/"):
        return unquote(path.removeprefix("/v1/adapters/")), None
    if method != "POST" or not isinstance(data, dict):
        return None
    if path == "/v1/adapters" and isinstance(data.get("name"), str) and isinstance(data.get("source"), str):
        return data["name"], data["source"]
    if path == "/v1/load_lora_adapter" and isinstance(data.get("lora_name"), str):
        return (data["lora_name"], data["lora_path"]) if isinstance(data.get("lora_path"), str) else None
    if path == "/v1/unload_lora_adapter" and isinstance(data.get("lora_name"), str):
        return data["lora_name"], None
    return None


def _model(path: str, body: bytes) -> str | None:
    if path not in GENERATION_ROUTES:
        return None
    data = _json(body)
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _failure(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return f"the replica serving this request failed ({type(err).__name__}: {first}): retry it"


# -- launching ------------------------------------------------------------------------------------


def serve_cluster(options: ServeOptions, replicas: int, ray_address: str | None = None) -> None:
    """Run the application on a local Ray (or the cluster at ``ray_address``) until SIGINT/SIGTERM."""
    from rich.console import Console

    console = Console(stderr=True)
    ray, serve = _import_ray()
    _check_adapters(options)
    started_ray = not ray.is_initialized() and ray_address is None
    with _quiet_ray():
        if ray_address is None:
            ray.init(num_cpus=max(os.cpu_count() or 1, replicas), include_dashboard=False, **_RAY_QUIET)
        else:
            try:
                ray.init(address=ray_address, **_RAY_QUIET)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot reach the Ray cluster at {ray_address}: {_first_line(err)}") from err
    deployed = False
    try:
        application = _application(options, replicas)
        with _quiet_ray():
            serve.start(http_options={"host": options.host, "port": options.port})
            if APP_NAME in serve.status().applications:  # never replace someone's running server
                raise UserError(
                    f"the Ray cluster already runs an '{APP_NAME}' application: stop that "
                    "`adapterhub serve --replicas` first (or `serve shutdown` on the cluster)"
                )
            deployed = True
            try:
                serve.run(application, name=APP_NAME, route_prefix="/")
            except RuntimeError as err:
                raise UserError(f"the replicas did not start: {_deploy_failure(err)}") from err
        url = f"http://{options.host}:{options.port}/v1"
        name = options.served_model_name or options.base
        where = "a local Ray" if ray_address is None else f"the Ray cluster at {ray_address}"
        console.print(
            f"serving {name} with {len(options.adapters)} adapter(s) on {url} "
            f"({replicas} replica(s) on {where})",
            markup=False,
            soft_wrap=True,
        )
        _wait_for_signal()
        console.print("stopping: in-flight requests get the grace period")
    finally:
        with _quiet_ray(), contextlib.suppress(Exception):
            if deployed:
                serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()
        if started_ray:
            ray.shutdown()


def build_app(args: dict[str, Any]) -> Any:
    """The application for ``serve run adapterhub.server.cluster:build_app key=value ...`` and for
    KubeRay's ``serveConfigV2``: the keys are ``serve``'s options with underscores (``adapters``,
    ``base``, ``replicas``, ``max_adapters``, ...); any other key is refused."""
    from dataclasses import fields

    from adapterhub.server.launch import ServeOptions, parse_adapter_specs

    settable = {item.name: item for item in fields(ServeOptions) if item.name not in ("host", "port")}
    unknown = sorted(set(args) - set(settable) - {"replicas"})
    if unknown:
        raise UserError(f"build_app: unknown option '{unknown[0]}': use {', '.join(['replicas', *settable])}")
    values: dict[str, Any] = {"adapters": parse_adapter_specs(str(args.get("adapters", "")))}
    for name, value in args.items():
        if name not in ("adapters", "replicas"):
            values[name] = _typed(name, value, settable[name].type)
    options = ServeOptions(**values)
    _check_adapters(options)
    return _application(options, int(args.get("replicas", 1)))


def _typed(name: str, value: Any, hint: Any) -> Any:
    """A ``key=value`` string (``serve run``) or a YAML value (KubeRay) as the option's type."""
    hint = str(hint)
    try:
        if hint.startswith("bool"):
            if isinstance(value, str) and value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value if isinstance(value, bool) else value.lower() == "true"
        if hint.startswith("int"):
            return int(value)
        if hint.startswith("float"):
            return float(value)
    except ValueError as err:
        raise UserError(f"build_app: option '{name}' must be {hint}, got {value!r}") from err
    return None if value is None else str(value)


def _check_adapters(options: ServeOptions) -> None:
    """Every adapter resolved (pulled) and checked by the contract here, before any replica starts."""
    from adapterhub.hub.adapter import inspect_adapter
    from adapterhub.hub.resolve import resolve
    from adapterhub.hub.specs import infer_base

    options.base = infer_base(options.adapters, options.base)
    for adapter in options.adapters:
        inspect_adapter(resolve(adapter.spec), label=adapter.name)


def _application(options: ServeOptions, replicas: int):
    import ray
    from ray import serve

    if ray.is_initialized():
        # "auto" means GPUs when the cluster has them: this machine may not be a GPU node.
        total = ray.cluster_resources()
        gpu = options.device == "cuda" or (options.device == "auto" and total.get("GPU", 0) >= 1)
        kind = "GPU" if gpu else "CPU"
        if int(total.get(kind, 0)) < replicas:
            raise UserError(
                f"--replicas {replicas} needs {replicas} {kind}(s), one per replica; the Ray cluster "
                f"has {int(total.get(kind, 0))}: lower --replicas or add nodes"
            )
    else:  # `serve run` builds the application before it connects: decide as this machine would
        import torch

        gpu = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    resources = {"num_cpus": 1, "num_gpus": 1} if gpu else {"num_cpus": 1}
    engines = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=replicas,
        ray_actor_options=resources,
        # The engine batches: one replica takes as many requests at once as the app queues.
        max_ongoing_requests=options.max_queue,
        graceful_shutdown_timeout_s=options.grace_s,
        health_check_period_s=2,
    )
    router = serve.deployment(
        serve.ingress()(Router),
        name=ROUTER,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, options.max_queue * replicas * 2),
        graceful_shutdown_timeout_s=options.grace_s,
    )
    return router.bind(engines.bind(options), {adapter.name: adapter.spec for adapter in options.adapters})


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise UserError(
            "--replicas needs Ray Serve: pip install 'adapterhub[cluster]' (or -e '.[cluster]')"
        ) from err
    return ray, serve


# Replica logs stay in Ray's session folder (/tmp/ray/session_*/logs), not on this terminal.
_RAY_QUIET = {"log_to_driver": False, "logging_level": logging.ERROR, "configure_logging": True}


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's and Ray Serve's logging off the terminal while we start and stop them."""
    loggers = [logging.getLogger(name) for name in ("ray", "ray.serve")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _wait_for_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _deploy_failure(err: BaseException) -> str:
    """The user error a replica's constructor raised, out of Ray's long deployment report."""
    found = re.findall(r"(?:UserError|RequestError): (.+)", str(err))
    return found[-1].strip() if found else _first_line(err)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
