"""``adapterhub eval``: the click command; the work is in ``adapterhub.eval.run``."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "--tasks",
    required=True,
    help="Comma-separated lm-eval task or group names (arc_easy,hellaswag) or task YAML files.",
)
@click.option(
    "--base", help="Base model: Hub id, local folder or builtin:tiny-llama (default: the adapters')."
)
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N documents of each task.")
@click.option(
    "--num-fewshot", type=click.IntRange(min=0), help="Few-shot examples per prompt (default: the task's)."
)
@click.option("--apply-chat-template", is_flag=True, help="Render prompts with the base's chat template.")
@click.option(
    "--quantize",
    "quantization",
    type=click.Choice(["none", "nf4", "int8"]),
    default="none",
    show_default=True,
    help="The base's weights while scoring (none: as lm-eval's hf model loads them).",
)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--no-save", is_flag=True, help="Do not write eval/<task>.json beside each adapter.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout.")
def eval_command(
    adapters: tuple[str, ...],
    tasks: str,
    no_save: bool,
    as_json: bool,
    **options,
) -> None:
    """Score ADAPTERS (store names, folders, REPO_ID[@REV], ALIAS=SPEC; 'base' for the base model)
    on lm-evaluation-harness tasks, all in one pass over one base."""
    from rich.console import Console

    from adapterhub.eval.report import scores_table
    from adapterhub.eval.run import BASE, EvalSettings, evaluate_adapters
    from adapterhub.server.launch import parse_adapter_specs

    task_specs = tuple(task.strip() for task in tasks.split(",") if task.strip())
    if not task_specs:
        raise click.BadParameter("give at least one task", param_hint="--tasks")
    names = [item.strip() for argument in adapters for item in argument.split(",") if item.strip()]
    specs = parse_adapter_specs(",".join(name for name in names if name != BASE))
    settings = EvalSettings(
        task_specs,
        limit=options.pop("limit"),
        num_fewshot=options.pop("num_fewshot"),
        apply_chat_template=options.pop("apply_chat_template"),
    )
    report = evaluate_adapters(specs, settings, include_base=BASE in names, save=not no_save, **options)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    console = Console()
    console.print(scores_table(report))
    for name, paths in report.saved.items():
        console.print(f"saved {name}: {', '.join(str(path) for path in paths)}", soft_wrap=True, markup=False)
