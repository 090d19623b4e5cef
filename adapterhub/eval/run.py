"""One evaluation: lm-eval tasks over the base and adapters of one engine, scores read and saved.

lm-eval runs once per adapter on the same loaded tasks; the shared ``RequestRunner`` (``lm.py``)
computes the first adapter's requests for all of them at once, in mixed batches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from adapterhub import __version__
from adapterhub.errors import UserError
from adapterhub.eval.report import EvalReport
from adapterhub.eval.results import Score, TaskScores, save_scores
from adapterhub.hub.adapter import one_line

if TYPE_CHECKING:
    from adapterhub.hub.specs import AdapterSpec
    from adapterhub.recipe import Recipe
    from adapterhub.runtime.serving import ServingEngine

BASE = "base"  # how the base model is named among the adapters to evaluate
TASK_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class EvalTarget:
    name: str  # BASE, or the adapter's name in the engine
    folder: Path | None = None  # where its results are saved; None for the base


@dataclass(frozen=True)
class EvalSettings:
    tasks: tuple[str, ...]  # lm-eval task or group names, or task YAML files
    limit: int | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False


def evaluate_adapters(
    adapters: list[AdapterSpec],
    settings: EvalSettings,
    *,
    include_base: bool,
    base: str | None = None,
    quantization: str = "none",
    dtype: str = "auto",
    device: str = "auto",
    save: bool = True,
) -> EvalReport:
    """Evaluate ``adapters`` (and the base, when ``include_base``) on one engine over their base;
    each adapter's scores are saved beside it unless ``save`` is off."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from adapterhub.hub.resolve import resolve
    from adapterhub.hub.specs import infer_base
    from adapterhub.models import is_seq2seq, load_config
    from adapterhub.runtime.backends import open_engine
    from adapterhub.runtime.serving import EngineConfig

    if not adapters and not include_base:
        raise UserError("nothing to evaluate: name adapters and/or 'base'")
    if not adapters and not base:
        raise UserError("evaluating 'base' alone needs the model: pass --base MODEL")
    base = infer_base(adapters, base)
    _check_causal(base, is_seq2seq(load_config(base)))
    task_manager(settings.tasks)  # a wrong task name fails now, before any model is loaded
    folders = {adapter.name: resolve(adapter.spec) for adapter in adapters}
    targets = ([EvalTarget(BASE)] if include_base else []) + [
        EvalTarget(name, folder) for name, folder in folders.items()
    ]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        terminal() as stream,
        Progress(*columns, console=Console(file=stream), transient=True) as progress,
    ):
        step = progress.add_task(f"loading {base}", total=None)
        with quiet():  # transformers' weight-loading bar
            engine = open_engine(  # the fast runtime, or the exact PEFT fallback for other causal bases
                EngineConfig(
                    base=base,
                    quantization=quantization,
                    dtype=dtype,
                    device=device,
                    max_adapters=max(1, min(8, len(adapters))),
                )
            )
        for name, folder in folders.items():
            engine.register(name, str(folder))
        label = f"lm-eval: {len(targets)} model(s), {len(settings.tasks)} task(s), requests"

        def advance(done: int, total: int) -> None:
            progress.update(step, description=label, completed=done, total=total)

        engine.start()
        try:
            scores = evaluate(engine, targets, settings, on_progress=advance)
        finally:
            engine.stop()
    report = EvalReport(base, settings.tasks, settings.limit, settings.num_fewshot, scores)
    if save:
        report.saved = save_all(scores, targets, base, settings)
    return report


def check_before_training(recipe: Recipe) -> None:
    """Refuse, before any training, a recipe whose ``eval`` section could not run afterwards."""
    from adapterhub.models import is_seq2seq, load_config

    if recipe.eval.tasks:
        _check_causal(recipe.model.name, is_seq2seq(load_config(recipe.model.name)))
        task_manager(tuple(recipe.eval.tasks))


def evaluate_trained(folder: Path, recipe: Recipe) -> EvalReport:
    """The recipe's ``eval`` section run on the adapter just written to ``folder`` (and the base)."""
    from adapterhub.hub.specs import AdapterSpec, default_name

    settings = EvalSettings(
        tuple(recipe.eval.tasks),
        limit=recipe.eval.limit,
        num_fewshot=recipe.eval.num_fewshot,
        apply_chat_template=recipe.eval.apply_chat_template,
    )
    return evaluate_adapters(
        [AdapterSpec(default_name(str(folder)), str(folder))],
        settings,
        include_base=recipe.eval.compare_base,
        base=recipe.model.name,
        quantization=recipe.model.quantization,
        dtype=recipe.model.dtype,
    )


def _check_causal(base: str, seq2seq: bool) -> None:
    if seq2seq:
        raise UserError(
            f"{base} is an encoder-decoder model; adapterhub eval scores causal LMs: use "
            "lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER for it"
        )


def is_task_file(spec: str) -> bool:
    return spec.endswith(TASK_FILE_SUFFIXES)


def task_manager(specs: tuple[str, ...]):
    """lm-eval's task index: the built-in tasks (about 40 s to index) only when a name needs them."""
    from lm_eval.tasks import TaskManager

    for spec in specs:
        if is_task_file(spec) and not Path(spec).is_file():
            raise UserError(f"task file {spec} not found: give an lm-eval task name or a task YAML file")
    with quiet():
        manager = TaskManager(include_defaults=not all(is_task_file(spec) for spec in specs))
    unknown = [spec for spec in specs if not is_task_file(spec) and spec not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task '{unknown[0]}': see `lm_eval ls tasks`, or give a task YAML file"
        )
    return manager


def load_tasks(specs: tuple[str, ...]) -> tuple[Any, list]:
    """The task index and the loaded tasks (datasets fetched): lm-eval's top-level task and group
    objects, loaded once and evaluated for every adapter."""
    manager = task_manager(specs)
    loaded = []
    for spec in specs:
        try:
            with quiet():
                tasks = manager.load([spec])
        except Exception as err:  # lm-eval and datasets raise anything on a task they cannot build
            raise UserError(f"task {spec}: lm-eval could not load it: {one_line(err)}") from err
        members = {name for names in tasks["group_map"].values() for name in names}
        loaded += [group for name, group in tasks["groups"].items() if name not in members]
        loaded += [task for name, task in tasks["tasks"].items() if name not in members]
    return manager, loaded


def evaluate(
    engine: ServingEngine,
    targets: list[EvalTarget],
    settings: EvalSettings,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[TaskScores]]:
    """Every target's scores on every task, in the order asked; the engine must be started."""
    import lm_eval

    from adapterhub.eval.lm import EngineLM, RequestRunner

    manager, tasks = load_tasks(settings.tasks)
    runner = RequestRunner(engine, on_progress=on_progress)
    models = {
        target.name: EngineLM(engine, None if target.folder is None else target.name, runner)
        for target in targets
    }
    scores = {}
    for name, model in models.items():
        with quiet():
            out = lm_eval.simple_evaluate(
                model=model,
                tasks=tasks,
                task_manager=manager,
                limit=settings.limit,
                num_fewshot=settings.num_fewshot,
                apply_chat_template=settings.apply_chat_template,
                log_samples=False,
            )
        scores[name] = scores_of(out)
    return scores


def scores_of(out: dict[str, Any]) -> list[TaskScores]:
    """lm-eval's results of the top-level tasks and groups (not a group's members) as TaskScores."""
    members = {name for names in (out.get("group_subtasks") or {}).values() for name in names}
    found = []
    for task, entry in out["results"].items():
        if task in members:
            continue
        config = (out.get("configs") or {}).get(task, {})
        higher = (out.get("higher_is_better") or {}).get(task, {})
        metrics = {}
        for key, value in entry.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            label = metric if filter_name == "none" else key
            metrics[label] = Score(
                float(value), float(stderr) if _is_number(stderr) else None, higher.get(metric)
            )
        found.append(
            TaskScores(
                task=task,
                metrics=metrics,
                num_fewshot=(out.get("n-shot") or {}).get(task),
                samples=((out.get("n-samples") or {}).get(task) or {}).get("effective"),
                version=(out.get("versions") or {}).get(task),
                dataset={
                    "path": config.get("dataset_path"),
                    "name": config.get("dataset_name"),
                    "split": config.get("test_split") or config.get("validation_split"),
                },
            )
        )
    return found


def save_all(
    scores: dict[str, list[TaskScores]], targets: list[EvalTarget], base_model: str, settings: EvalSettings
) -> dict[str, list[Path]]:
    """Each adapter's scores in its folder's ``eval/<task>.json`` (the base has no folder)."""
    import lm_eval

    saved = {}
    for target in targets:
        if target.folder is None:
            continue
        run = {
            "adapter": target.name,
            "base_model": base_model,
            "limit": settings.limit,
            "num_fewshot": settings.num_fewshot,
            "apply_chat_template": settings.apply_chat_template,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "adapterhub_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        saved[target.name] = [save_scores(target.folder, task, run) for task in scores[target.name]]
    return saved


def terminal() -> TextIO:
    """A stream onto the real stderr that ``quiet()`` leaves open, for our own progress."""
    return open(os.dup(sys.stderr.fileno()), "w", closefd=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's, datasets' and transformers' logs and progress bars (and the ``git`` lm-eval runs)
    off the terminal: stdout and stderr point at /dev/null, down to the file descriptors."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "evaluate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        os.dup2(sink, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(sink)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
