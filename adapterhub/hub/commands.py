"""``adapterhub push / pull / list / show / rm``: thin click front ends over the store and the Hub client."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.hub.transfer import DEFAULT_DEADLINE_S
from adapterhub.tables import print_table

console = Console()
status_console = Console(stderr=True)


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _source_folder(source: str) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if store.exists(source):
        return store.entry_path(source)
    raise UserError(
        f"'{source}' is neither a folder nor a store name{store.suggestion(source)}: see `adapterhub list`"
    )


@click.command()
@click.argument("source")
@click.argument("repo_id")
@click.option("--tag", help="Tag the pushed commit, e.g. v1.")
@click.option("--branch", help="Push to this branch (created from main if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--message", "-m", help="Commit message.")
@click.option("--base-model", help="Hub id of the base model, when the adapter records a local path.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push(
    source: str,
    repo_id: str,
    tag: str | None,
    branch: str | None,
    private: bool,
    message: str | None,
    base_model: str | None,
    as_json: bool,
) -> None:
    """Upload an adapter (training output dir or store name) to the Hub repo REPO_ID."""
    from adapterhub.hub.remote import push_folder

    with status_console.status(f"pushing to {repo_id}"):
        result = push_folder(
            _source_folder(source),
            repo_id,
            tag=tag,
            branch=branch,
            private=private,
            message=message,
            base_model=base_model,
        )
    if as_json:
        _print_json(asdict(result))
        return
    verb = "unchanged, nothing to push:" if result.no_op else "pushed"
    console.print(f"{verb} {result.url}\ncommit {result.commit}", highlight=False)


@click.command()
@click.argument("spec", metavar="REPO_ID[@REVISION]")
@click.option("--name", help="Store name (default: the repo name).")
@click.option("--subfolder", help="Folder inside the repo that holds the adapter.")
@click.option("--base-model", help="Warn if the adapter was trained on another base model.")
@click.option("--strict-base", is_flag=True, help="Refuse, rather than warn, on a base-model mismatch.")
@click.option(
    "--max-size",
    default="10GB",
    show_default=True,
    help="Refuse a repo whose adapter files are listed larger, and cut a transfer that passes it.",
)
@click.option(
    "--timeout",
    "timeout_s",
    default=DEFAULT_DEADLINE_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the whole pull may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pull(
    spec: str,
    name: str | None,
    subfolder: str | None,
    base_model: str | None,
    strict_base: bool,
    max_size: str,
    timeout_s: float,
    as_json: bool,
) -> None:
    """Download an adapter from the Hub into the local store; REVISION is a tag, branch or commit sha."""
    from adapterhub.hub.remote import pull as pull_adapter
    from adapterhub.hub.transfer import PullLimits, parse_size

    if strict_base and not base_model:
        raise UserError("--strict-base needs --base-model ORG/NAME to compare against")
    limits = PullLimits(max_bytes=parse_size(max_size), deadline_s=timeout_s)
    result = pull_adapter(
        spec, name=name, subfolder=subfolder, base_model=base_model, strict_base=strict_base, limits=limits
    )
    if as_json:
        _print_json(
            {"name": result.name, "path": result.path, "revision": result.revision, "no_op": result.no_op}
        )
        return
    verb = "already up to date:" if result.no_op else "pulled"
    console.print(
        f"{verb} {result.name} ({result.manifest.source_at_revision}) -> {result.path}", highlight=False
    )


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the store as JSON.")
def list_adapters(as_json: bool) -> None:
    """List the adapters in the local store."""
    entries = store.entries()
    if as_json:
        _print_json([asdict(entry) for entry in entries])
        return
    table = Table(title=f"adapters in {store.root()}")
    # "stored": what the weights file holds. P-tuning and prefix tuning with a projection train an
    # encoder that PEFT drops on save, so they store fewer parameters than they trained.
    for column in ("name", "method", "base model", "size", "stored params", "source@revision"):
        table.add_column(column, justify="right" if column in ("size", "stored params") else "left")
    for entry in entries:
        table.add_row(
            entry.name,
            entry.method,
            entry.base_model,
            _human_bytes(entry.size),
            f"{entry.params:,}",
            entry.source_at_revision,
        )
    print_table(table, console)


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show one stored adapter's manifest and files."""
    manifest = store.read(name)
    if as_json:
        _print_json({**asdict(manifest), "path": store.entry_path(name)})
        return
    table = Table(title=name, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in asdict(manifest).items():
        if key != "files" and value is not None:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    table.add_row("path", str(store.entry_path(name)))
    for file_name, digest in manifest.files.items():
        table.add_row(f"sha256 {file_name}", digest)
    print_table(table, console)


@click.command()
@click.argument("name")
def rm(name: str) -> None:
    """Remove an adapter from the local store."""
    store.remove(name)
    console.print(f"removed {name}", highlight=False)


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
