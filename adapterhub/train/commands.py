"""Click commands for training: ``train`` and ``params``."""

from __future__ import annotations

import json

import click
from rich.console import Console


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON on stdout.")
def train(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Train an adapter from RECIPE, with dotted overrides like training.max_steps=20."""
    from adapterhub.recipe import load_recipe
    from adapterhub.train.trainer import train as run

    result = run(load_recipe(recipe, overrides), console=Console(stderr=True))
    if as_json and result.metrics:
        click.echo(json.dumps(result.metrics, indent=2))


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def params(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Count trainable and total parameters of RECIPE without downloading weights."""
    from rich.table import Table

    from adapterhub.recipe import load_recipe
    from adapterhub.train.peft_model import count_recipe_parameters

    loaded = load_recipe(recipe, overrides)
    count = count_recipe_parameters(loaded)
    row = {
        "method": loaded.method.type,
        "model": loaded.model.name,
        "trainable": count.trainable,
        "total": count.total,
        "trainable_percent": round(count.percent, 4),
    }
    if as_json:
        click.echo(json.dumps(row))
        return
    table = Table(title=f"parameters of {recipe}")
    for key in row:
        table.add_column(key, justify="right" if key != "model" else "left")
    table.add_row(
        row["method"], row["model"], f"{count.trainable:,}", f"{count.total:,}", f"{count.percent:.3f}%"
    )
    Console().print(table)
