"""``adapterhub bench``: benchmark commands that print a table, or JSON with ``--json`` (never timed asserts).

The commands live here and import their benchmark (torch, transformers) only when they run, so that
``adapterhub bench serve --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from adapterhub.errors import UserError
from adapterhub.tables import print_table

FAMILY_COUNT = 5  # lora, ia3, prompt_tuning, p_tuning, prefix_tuning


@click.group()
def bench() -> None:
    """Measure training and serving speed, memory and accuracy."""


@contextlib.contextmanager
def phases(name: str) -> Iterator[Callable[[str], None]]:
    """Report each phase of a long benchmark on stderr: a live spinner on a terminal, else one line each."""
    console = Console(stderr=True)
    started = time.perf_counter()
    if console.is_terminal:
        with console.status(name) as status:
            yield lambda phase: status.update(f"{name}: {phase}")
        return

    def report(phase: str) -> None:
        console.print(
            f"{name}: {phase} ({time.perf_counter() - started:.0f} s)", markup=False, highlight=False
        )

    yield report


def refuse_unused(names: tuple[str, ...], why: str) -> None:
    """An option given that this run would not use is an error naming it, never silently ignored."""
    context = click.get_current_context()
    for parameter in context.command.params:
        given = context.get_parameter_source(parameter.name) in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        )
        if parameter.name in names and given:
            raise click.UsageError(f"{parameter.opts[0]} {why}")


def print_result(result: dict[str, Any], title: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if not isinstance(value, dict):
            table.add_row(key, str(value))
    print_table(table)


def engine_options(command: Callable) -> Callable:
    """The options every engine benchmark shares: which device, base and quantization."""
    for option in reversed(
        [
            click.option(
                "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
            ),
            click.option(
                "--base",
                default="builtin:tiny-llama",
                show_default=True,
                help="builtin:tiny-llama, a folder, a .gguf file or random:<hub-id>",
            ),
            click.option(
                "--quantize",
                type=click.Choice(["auto", "nf4", "int8", "none"]),
                default="auto",
                show_default=True,
            ),
        ]
    ):
        command = option(command)
    return command


@bench.command("train")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override, repeatable.")
@click.option("--random", "random_weights", is_flag=True, help="Random weights and synthetic batches.")
@click.option(
    "--steps", default=20, type=click.IntRange(min=1), show_default=True, help="Timed training steps."
)
@click.option(
    "--warmup",
    default=3,
    type=click.IntRange(min=1),
    show_default=True,
    help="Untimed first steps (compile, allocate).",
)
@click.option("--eval-batches", default=10, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--label-tokens",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Label length of synthetic batches.",
)
@click.option(
    "--baseline", is_flag=True, help="Also run each recipe in plain-PEFT fp32 and report the speed-up."
)
@click.option(
    "--full",
    is_flag=True,
    help="Train each recipe as `adapterhub train` does (its own length, output.dir written), then score it.",
)
@click.option(
    "--test",
    "test_path",
    type=click.Path(dir_okay=False, exists=True),
    help="Held-out prompt/completion rows to score accuracy on (default: the validation split).",
)
@click.option("--zero-shot", is_flag=True, help="Add the base model alone, same prompts, as a first row.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_train(recipes: tuple[str, ...], overrides: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Train each RECIPE briefly and report params, peak memory, train/eval it/s and accuracy."""
    from adapterhub.train.bench import bench_recipes, results_table

    with phases("bench train") as progress:
        report = bench_recipes(list(recipes), overrides, progress=progress, **options)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    print_table(results_table(report))


@bench.command("serve")
@engine_options
@click.option("--adapters", default=8, show_default=True, help="adapters, families round-robin over all five")
@click.option("--batch", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank (all 7 projections)"
)
@click.option(
    "--static-decode",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="bucketed static decode shapes, as CUDA graphs on CUDA (auto: on for CUDA)",
)
@click.option(
    "--distinct",
    type=click.IntRange(min=1),
    help="many adapters instead: each batch's rows cycle over N distinct LoRAs (see --registered)",
)
@click.option(
    "--registered", type=click.IntRange(min=1), help="with --distinct: LoRAs registered in all (default N)"
)
@click.option("--slots", type=click.IntRange(min=1), help="with --distinct: device slots (default N)")
@click.option(
    "--skew",
    type=click.Choice(["uniform", "zipf"]),
    default="uniform",
    show_default=True,
    help="with --distinct: how each batch draws its adapters from the registered ones",
)
@click.option(
    "--rounds", default=4, show_default=True, type=click.IntRange(min=1), help="with --distinct: batches"
)
@click.option(
    "--targets",
    default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    show_default=True,
    help="with --distinct: the LoRAs' target modules",
)
@click.option(
    "--repeats",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="rounds in which the phases take turns; medians are reported (use 3+ on a shared machine)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_serve(as_json: bool, **options: Any) -> None:
    """Base vs one adapter vs all five families mixed in one batch, against plain PEFT; with
    --distinct, many LoRA adapters (distinct per batch, registered, slots, skew) against the base."""
    many_keys = ("registered", "slots", "skew", "rounds", "targets")
    many = {key: options.pop(key) for key in ("distinct", *many_keys)}
    if many["distinct"] is not None:
        refuse_unused(("adapters",), "sizes the families bench: with --distinct, --registered does")
        _bench_many(many, options, as_json)
        return
    refuse_unused(many_keys, "is for the many-adapter bench: give --distinct N too")
    if options["adapters"] < FAMILY_COUNT:
        raise UserError(f"--adapters {options['adapters']} cannot cover all five families: use 5 or more")
    from adapterhub.runtime.bench import run_bench

    with phases("bench serve") as progress:
        result = run_bench(**options, progress=progress)
    title = f"serve bench: {result['base']} {result['quantization']} on {result['device_name']}"
    print_result(result, title, as_json)


def _bench_many(many: dict[str, Any], options: dict[str, Any], as_json: bool) -> None:
    distinct = many["distinct"]
    registered = many["registered"] or distinct
    slots = many["slots"] or distinct
    if registered < distinct:
        raise UserError(
            f"--registered {registered} is below --distinct {distinct}: register at least as many"
        )
    if slots < distinct:
        raise UserError(
            f"--slots {slots} cannot hold a batch's {distinct} distinct adapters: use {distinct} or more"
        )
    from adapterhub.runtime.bench_many import run_many_bench

    engine_keys = (
        "device",
        "base",
        "quantize",
        "batch",
        "prompt_len",
        "new_tokens",
        "rank",
        "static_decode",
        "repeats",
    )
    with phases("bench serve (many adapters)") as progress:
        result = run_many_bench(
            **{key: options[key] for key in engine_keys},
            **{**many, "registered": registered, "slots": slots},
            progress=progress,
        )
    print_result(result, f"many-adapter bench: {result['base']} on {result['device']}", as_json)


@bench.command("http")
@engine_options
@click.option(
    "--adapters",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="families round-robin; the base takes requests too",
)
@click.option("--requests", default=200, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--concurrency",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="client threads, and the engine's batch size",
)
@click.option("--prompt-len", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--stream/--no-stream", default=True, show_default=True, help="stream (and measure time to first token)"
)
@click.option("--logprobs", is_flag=True, help="add a run with logprobs (top 5), as a ratio to plain")
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="add a run constrained by this JSON schema, as a ratio to plain",
)
@click.option("--url", help="drive this OpenAI-compatible server instead (prompts from --base's vocabulary)")
@click.option("--models", help="with --url: the model names to use, round-robin (default: all it lists)")
@click.option(
    "--repeats",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="rounds of all HTTP runs in turn; medians are reported (use 3+ on a busy machine)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_http(as_json: bool, **options: Any) -> None:
    """The server's throughput and latency against the engine called directly, same requests;
    with --url, the same load against any OpenAI-compatible server."""
    if options["models"] and not options["url"]:
        raise click.UsageError("--models names the models of a --url server: give --url too")
    if options["url"]:
        refuse_unused(
            ("device", "quantize", "adapters"), "sets up a local engine: with --url the server is given"
        )
    if options["json_schema"] is not None:
        try:
            json.loads(options["json_schema"].read_text())
        except ValueError as err:
            raise click.BadParameter(
                f"{options['json_schema']} is not JSON: {err}", param_hint="--json-schema"
            ) from None
    from adapterhub.server.bench import run_http_bench

    with phases("bench http") as progress:
        result = run_http_bench(**options, progress=progress)
    where = (
        f"at {result['url']}" if "url" in result else f"{result['quantization']} on {result['device_name']}"
    )
    title = f"http bench: {result['base']} {where}"
    print_result(result, title, as_json)
