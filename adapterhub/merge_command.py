"""``adapterhub merge``: the click front end of ``adapterhub.merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from adapterhub.merge import (
    ALL_COMBINE_METHODS,
    BASE_WEIGHT_POLICIES,
    OUTPUT_DTYPES,
    STEPS,
    MergePlan,
    MergeRequest,
    merge,
    parse_weights,
)

if TYPE_CHECKING:
    from adapterhub.hub import PushResult


def _choices(values: tuple[str, ...]) -> str:
    return f"[{'|'.join(values)}]"


@click.command(name="merge")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "--base",
    help="Base model (Hub id, folder, builtin:..., a .gguf file); default: the adapters' recorded base.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the model to.")
@click.option(
    "--dtype", default="auto", show_default=True, metavar=_choices(OUTPUT_DTYPES), help="auto: the base's."
)
@click.option("--combine", metavar=_choices(ALL_COMBINE_METHODS), help="How to combine several adapters.")
@click.option("--weights", help="Comma-separated weight per adapter; default: equal weights summing to 1.")
@click.option("--density", type=float, help="Fraction of each delta kept by ties and dare_*.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of dare_* random pruning.")
@click.option(
    "--base-weights",
    default="auto",
    show_default=True,
    metavar=_choices(BASE_WEIGHT_POLICIES),
    help="Merge into the original weights or the dequantized NF4 ones; auto picks nf4 for adapters whose "
    "recipe trained on NF4.",
)
@click.option("--push", "push_repo", metavar="REPO_ID", help="Upload the merged model to this Hub repo.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the merge settings as JSON.")
def merge_command(
    adapters: tuple[str, ...],
    base: str | None,
    out: Path,
    dtype: str,
    combine: str | None,
    weights: str | None,
    density: float | None,
    seed: int,
    base_weights: str,
    push_repo: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Fold LoRA or IA3 ADAPTERS (store names, folders or REPO_ID[@REV]) into a standalone model."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers.utils import logging

    # Our progress bar covers loading and saving; transformers' own tqdm bars would interleave with it.
    logging.disable_progress_bar()

    request = MergeRequest(
        adapters=list(adapters),
        out=out,
        base=base,
        dtype=dtype,
        combine=combine,
        weights=parse_weights(weights),
        density=density,
        seed=seed,
        base_weights=base_weights,
        overwrite=overwrite,
    )
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    # Off a terminal rich would print nothing but a stray blank line before errors.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("checking adapters", total=len(STEPS))

        def on_step(step: str) -> None:
            progress.update(task, description=step, completed=STEPS.index(step))

        plan = merge(request, on_step)
    pushed = None
    if push_repo is not None:
        from adapterhub.hub import push_folder

        pushed = push_folder(plan.out, push_repo, kind="model")
    if as_json:
        click.echo(
            json.dumps({"out": str(plan.out), **plan.settings, "pushed": _pushed_json(pushed)}, indent=2)
        )
    else:
        _print_summary(plan, pushed)


def _pushed_json(pushed: PushResult | None) -> dict | None:
    return None if pushed is None else {"url": pushed.url, "commit": pushed.commit, "no_op": pushed.no_op}


def _print_summary(plan: MergePlan, pushed: PushResult | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"merged into {plan.out}")
    for column in ("adapter", "method", "rank", "weight", "trained on"):
        table.add_column(column)
    for adapter, weight in plan.weighted_adapters:
        table.add_row(
            adapter.spec,
            adapter.method,
            str(adapter.rank or "-"),
            f"{weight:g}",
            adapter.trained_quantization or "unknown",
        )
    console = Console()
    console.print(table)
    console.print(
        f"base {plan.base} ({plan.base_weights} weights), combine {plan.combine or 'none'}, "
        f"density {plan.density or '-'}, dtype {plan.dtype}"
    )
    if pushed is not None:
        console.print(f"pushed {pushed.url} at {pushed.commit}" + (" (unchanged)" if pushed.no_op else ""))
