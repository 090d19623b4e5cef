"""``adapterhub train``: fit an adapter from a recipe with transformers' Trainer, write a complete output dir.

The run works in ``.<dir>.partial`` beside the output dir (checkpoints live there, so
``training.resume=true`` can continue an interrupted run from its newest complete checkpoint) and
the finished adapter appears in ``output.dir`` by one atomic rename. The output dir, and the store
name if any, stay locked from the first check to that rename, so a second run into either fails at
once. Launched under ``accelerate launch`` or ``torchrun`` the same code trains data-parallel;
only the main process writes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import PeftModel
from rich.console import Console
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from adapterhub.card import adapter_card
from adapterhub.errors import UserError
from adapterhub.hub import store
from adapterhub.hub.store import add_folder, check_name
from adapterhub.hub.store import exists as store_exists
from adapterhub.models import base_id, is_seq2seq, load_tokenizer
from adapterhub.paths import atomic_dir, disk_errors, exclusive_lock
from adapterhub.recipe import Recipe
from adapterhub.tables import print_table
from adapterhub.train import checkpoints
from adapterhub.train.data import Splits, Tokenize, collator_for, load_splits
from adapterhub.train.display import RichProgress, summary_table
from adapterhub.train.evaluate import generation_accuracy, teacher_forced
from adapterhub.train.peft_model import (
    build_peft_model,
    checkpoint_unties_lm_head,
    count_parameters,
    model_spec,
)

CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def compile_errors() -> Iterator[None]:
    """Turn a ``training.compile`` graph that this machine's C++ toolchain cannot build into one line."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    try:
        yield
    except (InductorError, BackendCompilerFailed) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"training.compile: torch.compile could not build the training step here ({reason}); "
            "set training.compile: false to train eagerly"
        ) from err


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, Any]
    model: PeftModel | None = None  # the trained model, on the main process


class AdapterTrainer(Trainer):
    """transformers' Trainer, minus a walk over every parameter on every step.

    Trainer estimates FLOPs per step with ``model.num_parameters()``, which visits all ~850 tensors of
    mt0-large each time: milliseconds per step, a real share of a compiled adapter step. The count
    never changes during training, so it is taken once.
    """

    @functools.cached_property
    def non_embedding_params(self) -> int:
        return self.model.num_parameters(exclude_embeddings=True)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        return 6 * inputs[main_input].numel() * self.non_embedding_params

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's save, then the marker that says it is whole, then the older checkpoints go."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            checkpoints.mark_complete_and_prune(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.with_name(f".{output_dir.name}.partial")


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint an interrupted run into ``output_dir`` left (what resume takes)."""
    folder = work_dir_for(output_dir) / CHECKPOINTS
    return checkpoints.newest_complete(folder)[0] if folder.is_dir() else None


def check_store_name(recipe: Recipe) -> None:
    """Fail before training, not after, when the store name is invalid or taken."""
    name = recipe.output.store_name
    if name is not None:
        check_name(name)
        if store_exists(name) and not recipe.training.overwrite:
            raise UserError(
                f"store name '{name}' is taken: set training.overwrite=true or choose another "
                "output.store_name"
            )


def check_output_dir(recipe: Recipe) -> Path:
    output_dir = Path(recipe.output.dir)
    if output_dir.exists():
        if recipe.training.resume:
            raise UserError(
                f"output dir {output_dir} holds a finished run; nothing to resume: "
                "set training.overwrite=true to train again or choose another output.dir"
            )
        if not recipe.training.overwrite:
            raise UserError(
                f"output dir {output_dir} already exists: set training.overwrite=true "
                "or choose another output.dir"
            )
    return output_dir


def precision_flags(precision: str, device: torch.device) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(
    recipe: Recipe, work_dir: Path, device: torch.device, has_eval: bool
) -> TrainingArguments:
    t = recipe.training
    return TrainingArguments(
        output_dir=str(work_dir / CHECKPOINTS),
        max_steps=t.max_steps,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optim,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps and has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # AdapterTrainer keeps the newest complete checkpoint itself
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=device.type == "cpu",
        # The NaN/inf filter reads the loss back every step; that sync stalls the GPU queue.
        logging_nan_inf_filter=False,
        torch_compile=t.compile,
        torch_compile_mode=t.compile_mode if t.compile and t.compile_mode != "default" else None,
        **precision_flags(t.precision, device),
    )


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's peak resident set."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # elsewhere the CPU peak stays the whole process's
        Path("/proc/self/clear_refs").write_text("5")


def tokenized(splits: Splits, tokenize: Tokenize, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    train = [tokenize(row, splits.format) for row in splits.train]
    validation = [tokenize(row, splits.format) for row in splits.validation[:limit]]
    return train, validation


@contextlib.contextmanager
def writer_locks(recipe: Recipe, main_process: bool) -> Iterator[None]:
    """The output dir's lock and, with ``output.store_name``, the store name's (main process only)."""
    with contextlib.ExitStack() as stack:
        if main_process:
            output_dir = Path(recipe.output.dir)
            stack.enter_context(
                exclusive_lock(
                    output_dir.with_name(f".{output_dir.name}.lock"),
                    f"output dir {output_dir}",
                    "wait for that run to finish, or choose another output.dir",
                )
            )
            if recipe.output.store_name:
                stack.enter_context(store.lock(recipe.output.store_name))
        yield


def resume_checkpoint(recipe: Recipe, work_dir: Path, console: Console, main_process: bool) -> str | None:
    """The newest complete checkpoint when ``training.resume`` is set; incomplete newer ones go."""
    if not recipe.training.resume:
        return None
    found, incomplete = checkpoints.newest_complete(work_dir / CHECKPOINTS)
    if found is None:
        raise UserError(
            f"training.resume=true but {work_dir} holds no complete checkpoint: "
            "set training.resume=false to train from the start"
        )
    from adapterhub.contract import read_adapter

    try:  # the adapter contract at this door too: a diverged (NaN) or foreign checkpoint is refused
        read_adapter(found)
    except UserError as err:
        raise UserError(
            f"training.resume=true but {found.name} cannot be resumed from ({err}): "
            "set training.resume=false to train from the start"
        ) from err
    if main_process:
        for folder in incomplete:
            console.print(f"[yellow]skipping {folder.name}: its save was interrupted", highlight=False)
            checkpoints.remove(folder)
        console.print(f"resuming from {found.name} (step {checkpoints.step_of(found)})", highlight=False)
    return str(found)


def train(recipe: Recipe, console: Console | None = None) -> TrainResult:
    """Train the adapter ``recipe`` describes; return where it was written and its metrics."""
    console = console or Console(stderr=True)
    # On CPU, accelerate only sets up gloo data parallelism (torchrun/accelerate launch) when told cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    with writer_locks(recipe, state.is_main_process):
        return _train(recipe, console, state)


def _train(recipe: Recipe, console: Console, state: PartialState) -> TrainResult:
    output_dir = check_output_dir(recipe)
    check_store_name(recipe)
    if recipe.eval.tasks:
        from adapterhub.eval.run import check_before_training

        check_before_training(recipe)
    work_dir = work_dir_for(output_dir)
    if state.is_main_process:
        for note in recipe.notes:
            console.print(f"note: {note}", style="dim", markup=False, highlight=False)
    resume_from = resume_checkpoint(recipe, work_dir, console, state.is_main_process)
    if not recipe.training.resume and state.is_main_process and work_dir.exists():
        shutil.rmtree(work_dir)
    state.wait_for_everyone()

    tokenizer = load_tokenizer(recipe.model.name)
    splits = load_splits(recipe.data)
    model = build_peft_model(recipe, device=str(state.device) if state.num_processes > 1 else "auto")
    device = next(model.parameters()).device
    seq2seq = is_seq2seq(model.config)
    tokenize = Tokenize(tokenizer, recipe.data, seq2seq=seq2seq)
    train_rows, eval_rows = tokenized(splits, tokenize, recipe.training.eval_max_samples)
    collator = collator_for(tokenizer, recipe.data, seq2seq=seq2seq, fixed_shape=recipe.training.compile)
    progress = RichProgress(console)
    trainer = AdapterTrainer(
        model=model,
        args=training_arguments(recipe, work_dir, device, has_eval=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    if state.is_main_process:
        initial = evaluate(model, tokenizer, collator, splits, eval_rows, recipe, seq2seq, generation=False)
    started = time.perf_counter()
    try:
        with disk_errors(work_dir), compile_errors():  # checkpoints are written there
            output = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        progress.close()  # an interrupt skips on_train_end; the live bar must not outlive it
    elapsed = time.perf_counter() - started
    if not state.is_main_process:
        state.wait_for_everyone()
        return TrainResult(output_dir, {})

    name = recipe.model.name
    params = count_parameters(model, untied_lm_head=checkpoint_unties_lm_head(model.get_base_model(), name))
    metrics: dict[str, Any] = {
        "method": recipe.method.type,
        "base_model": base_id(name),
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": round(params.percent, 4),
        "steps": output.global_step,
        "train_loss": output.training_loss,
        "train_seconds": round(elapsed, 2),
        "train_it_s": round(output.global_step / elapsed, 3) if elapsed else 0.0,
        "processes": state.num_processes,
        "peak_memory_mib": round(peak_memory_mib(device), 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **{f"initial_{key}": value for key, value in initial.items() if key != "eval_it_s"},
        **evaluate(model, tokenizer, collator, splits, eval_rows, recipe, seq2seq, generation=True),
    }
    write_output(model, recipe, metrics, trainer.state.log_history, output_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    evaluation, eval_error = None, None
    if recipe.eval.tasks:  # after the adapter is safe on disk: a failed evaluation must not lose it
        from adapterhub.eval.run import evaluate_trained

        try:
            evaluation = evaluate_trained(output_dir, recipe)
            metrics["eval"] = evaluation.to_json()["results"]
        except UserError as err:
            eval_error = err
    if recipe.output.store_name:
        add_folder(output_dir, recipe.output.store_name, replace=recipe.training.overwrite)
        metrics["store_name"] = recipe.output.store_name
    shown = {key: value for key, value in metrics.items() if key != "eval"}  # eval: a table of its own
    print_table(
        summary_table(f"trained {recipe.method.type}", {"output_dir": str(output_dir), **shown}), console
    )
    if evaluation is not None:
        from adapterhub.eval.report import scores_table

        print_table(scores_table(evaluation), console)
    if eval_error is not None:
        raise UserError(f"the adapter is saved in {output_dir}, but its evaluation failed: {eval_error}")
    state.wait_for_everyone()
    return TrainResult(output_dir, metrics, model)


def evaluate(
    model,
    tokenizer,
    collator,
    splits: Splits,
    eval_rows: list[dict],
    recipe: Recipe,
    seq2seq: bool,
    *,
    generation: bool,
) -> dict[str, Any]:
    if not eval_rows:
        return {}
    batch_size = recipe.training.eval_batch_size or recipe.training.batch_size
    metrics = teacher_forced(model, collator, eval_rows, seq2seq=seq2seq, batch_size=batch_size)
    if splits.labels is None:
        metrics.pop("accuracy")
    elif generation and recipe.training.generation_eval:
        rows = splits.validation[: recipe.training.eval_max_samples]
        device = str(next(model.parameters()).device)
        metrics["generation_accuracy"] = generation_accuracy(
            model, tokenizer, rows, seq2seq=seq2seq, batch_size=batch_size, base=model_spec(recipe, device)
        )
    model.train()
    return metrics


def write_output(
    model, recipe: Recipe, metrics: dict[str, Any], log_history: list[dict], output_dir: Path
) -> None:
    """Adapter files, resolved recipe, metrics, loss curve and model card, appearing all at once."""
    with atomic_dir(output_dir, replace=True) as tmp:
        model.save_pretrained(tmp)
        # Local paths relative to the output dir, so the written recipe runs from wherever it is.
        recipe_yaml = recipe.to_yaml(relative_to=output_dir)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        has_curve = plot_loss(log_history, tmp / "loss_curve.png")
        (tmp / "README.md").write_text(
            adapter_card(
                base_model=metrics["base_model"],
                method=recipe.method.type,
                title=f"{recipe.method.type} adapter for {metrics['base_model']}",
                metrics={
                    k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
                },
                recipe_yaml=recipe_yaml,
                curve_png="loss_curve.png" if has_curve else None,
            )
        )


def plot_loss(log_history: list[dict], path: Path) -> bool:
    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*points, strict=True), marker="o", markersize=3)
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="s", markersize=3, label="eval")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
