"""Small commands that belong to no bigger area."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "mt5"]), default="llama", show_default=True)
def tiny(out_dir: Path, arch: str) -> None:
    """Write a deterministic tiny random model and a locally trained tokenizer to OUT_DIR."""
    from adapterhub.tiny import write_tiny

    click.echo(str(write_tiny(out_dir, arch)))
