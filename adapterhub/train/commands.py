"""Click commands for training: ``train`` and ``params``."""

from __future__ import annotations

import json
import re
import shlex
import sys

import click
from rich.console import Console

OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[\w.]+=")


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as JSON on stdout.")
def train(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Train an adapter from RECIPE, with dotted overrides like training.max_steps=20."""
    from adapterhub.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)  # checked before torch is even imported

    from adapterhub.train.trainer import train as run

    try:
        result = run(loaded, console=Console(stderr=True))
    except KeyboardInterrupt:
        click.secho(interrupted_message(recipe, overrides, loaded), fg="yellow", err=True)
        sys.exit(130)
    if as_json and result.metrics:
        click.echo(json.dumps(result.metrics, indent=2))


def interrupted_message(path: str, overrides: tuple[str, ...], recipe) -> str:
    """What a Ctrl-C left behind, and the command that carries on from it."""
    from pathlib import Path

    from adapterhub.train.trainer import last_checkpoint

    kept = [pair for pair in overrides if not pair.startswith("training.resume=")]
    command = shlex.join(["adapterhub", "train", path, *kept, "training.resume=true"])
    checkpoint = last_checkpoint(Path(recipe.output.dir))
    if checkpoint is None:
        every = recipe.training.save_steps
        saved = (
            f"no checkpoint was saved yet (one every training.save_steps={every} steps), so it starts over"
        )
    else:
        saved = f"the last checkpoint is {checkpoint}"
    return f"interrupted: {saved}; resume with: {command}"


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="RECIPE... [SECTION.KEY=VALUE...]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per recipe, one per line.")
def params(args: tuple[str, ...], as_json: bool) -> None:
    """Count trainable and total parameters of each RECIPE without downloading weights.

    Overrides apply to every recipe, e.g. `adapterhub params recipes/seed/*.yaml method.r=16`.
    """
    from rich.table import Table

    from adapterhub.errors import UserError
    from adapterhub.recipe import load_recipe
    from adapterhub.tables import print_table

    overrides = tuple(arg for arg in args if OVERRIDE.match(arg))
    paths = [arg for arg in args if not OVERRIDE.match(arg)]
    if not paths:
        raise UserError("params needs at least one recipe file, e.g. adapterhub params recipes/lora.yaml")
    recipes = [load_recipe(path, overrides) for path in paths]  # all checked before any model is built

    from adapterhub.train.peft_model import count_recipe_parameters

    rows = []
    for path, loaded in zip(paths, recipes, strict=True):
        count = count_recipe_parameters(loaded)
        rows.append(
            {
                "recipe": path,
                "method": loaded.method.type,
                "model": loaded.model.name,
                "trainable": count.trainable,
                "total": count.total,
                "trainable_percent": round(count.percent, 4),
            }
        )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = Table(title="parameters" + (f" ({' '.join(overrides)})" if overrides else ""))
    for key in rows[0]:
        table.add_column(key, justify="left" if key in ("recipe", "method", "model") else "right")
    for row in rows:
        table.add_row(
            row["recipe"],
            row["method"],
            row["model"],
            f"{row['trainable']:,}",
            f"{row['total']:,}",
            f"{row['trainable_percent']:.3f}%",
        )
    print_table(table)
