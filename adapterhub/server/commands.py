"""``adapterhub serve``: the click command; the work is in ``adapterhub.server.launch``."""

from __future__ import annotations

import click

from adapterhub.server.defaults import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS_CAP,
    DEFAULT_READ_TIMEOUT_S,
    ENV_VAR,
)


@click.command()
@click.option(
    "--base",
    help="Base model: Hub id, local folder, builtin:tiny-llama or a .gguf file. Default: the adapters' own.",
)
@click.option(
    "--adapters",
    default="",
    help="Comma-separated specs (store name, folder, REPO_ID[@REV]), each ALIAS=SPEC or SPEC.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 exposes the server."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--quantize",
    "quantization",
    type=click.Choice(["auto", "nf4", "int8", "none"]),
    default="auto",
    show_default=True,
    help="auto: nf4 on CUDA, none on CPU.",
)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option(
    "--api-key",
    envvar="ADAPTERHUB_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 routes (or set ADAPTERHUB_API_KEY).",
)
@click.option(
    "--max-adapters",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Adapters kept on the device; more wait in a CPU tier.",
)
@click.option(
    "--max-batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows decoded together; the KV cache holds this many rows of --max-context positions.",
)
@click.option(
    "--max-context",
    type=click.IntRange(min=2),
    help="Prompt + virtual tokens + reply per row (default: the base's, at most 4096).",
)
@click.option(
    "--max-lora-rank",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Widest LoRA rank a device slot holds.",
)
@click.option(
    "--max-queue",
    default=DEFAULT_MAX_QUEUE,
    show_default=True,
    type=click.IntRange(min=1),
    help="Generations in flight before answering 429.",
)
@click.option(
    "--max-tokens-cap",
    default=DEFAULT_MAX_TOKENS_CAP,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest max_tokens a request may ask for.",
)
@click.option(
    "--max-body-bytes", default=DEFAULT_MAX_BODY_BYTES, show_default=True, type=click.IntRange(min=1)
)
@click.option(
    "--grace",
    "grace_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds in-flight requests get to finish on SIGTERM.",
)
@click.option(
    "--served-model-name",
    help="The base model's id for clients (default: --base as given, e.g. a local path).",
)
@click.option(
    "--strict-base",
    is_flag=True,
    help="Refuse adapters recorded for another base model (default: warn and serve them).",
)
@click.option(
    "--allow-runtime-loading",
    is_flag=True,
    envvar=ENV_VAR,
    help=f"Let clients load and unload adapters (POST/DELETE /v1/adapters) [env: {ENV_VAR}=1].",
)
@click.option(
    "--adapter-root",
    "adapter_roots",
    multiple=True,
    help="With --allow-runtime-loading: a folder clients may load adapter folders from (repeatable).",
)
@click.option(
    "--allow-hub-pulls",
    is_flag=True,
    help="With --allow-runtime-loading: clients may load Hub ids too (pulled within pull's limits).",
)
@click.option(
    "--admin-api-key",
    envvar="ADAPTERHUB_ADMIN_API_KEY",
    help="With --allow-runtime-loading: the key loading and unloading need instead of --api-key.",
)
@click.option(
    "--allowed-hosts",
    default="",
    help="Comma-separated Host names to answer, e.g. localhost,127.0.0.1,*.example.com. Default: any.",
)
@click.option(
    "--read-timeout",
    "read_timeout_s",
    default=DEFAULT_READ_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client gets to send a request's headers, and again its body.",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    help="Serve on Ray Serve with this many engine replicas, routed by adapter (pip install '.[cluster]').",
)
@click.option("--ray-address", help="With --replicas: the Ray cluster to join (default: a local one).")
def serve(
    adapters: str, allowed_hosts: str, replicas: int | None, ray_address: str | None, **options
) -> None:
    """Serve a base model and many adapters of any PEFT family over the OpenAI API."""
    from adapterhub.server.launch import ServeOptions, parse_adapter_specs, serve

    hosts = tuple(host.strip() for host in allowed_hosts.split(",") if host.strip())
    serve_options = ServeOptions(adapters=parse_adapter_specs(adapters), allowed_hosts=hosts, **options)
    if replicas is None:
        if ray_address is not None:
            raise click.BadParameter("only with --replicas N", param_hint="--ray-address")
        serve(serve_options)
        return
    from adapterhub.server.cluster import serve_cluster

    serve_cluster(serve_options, replicas, ray_address)
