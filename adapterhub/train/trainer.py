"""``adapterhub train``: fit an adapter from a recipe with transformers' Trainer, write a complete output dir.

The run works in ``.<dir>.partial`` beside the output dir (checkpoints live there, so
``training.resume=true`` can continue an interrupted run) and the finished adapter appears in
``output.dir`` by one atomic rename. Launched under ``accelerate launch`` or ``torchrun`` the
same code trains data-parallel; only the main process writes.
"""

from __future__ import annotations

import functools
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import PeftModel
from rich.console import Console
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from adapterhub.card import adapter_card
from adapterhub.errors import UserError
from adapterhub.hub.store import add_folder, check_name
from adapterhub.hub.store import exists as store_exists
from adapterhub.models import is_seq2seq, load_tokenizer, split_random
from adapterhub.paths import atomic_dir
from adapterhub.recipe import Recipe
from adapterhub.train.data import Splits, Tokenize, collator_for, load_splits
from adapterhub.train.display import RichProgress, summary_table
from adapterhub.train.evaluate import generation_accuracy, teacher_forced
from adapterhub.train.peft_model import build_peft_model, checkpoint_unties_lm_head, count_parameters

CHECKPOINTS = "checkpoints"


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


def work_dir_for(output_dir: Path) -> Path:
    return output_dir.with_name(f".{output_dir.name}.partial")


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
        save_total_limit=1,
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


def tokenized(splits: Splits, tokenize: Tokenize, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    train = [tokenize(row, splits.format) for row in splits.train]
    validation = [tokenize(row, splits.format) for row in splits.validation[:limit]]
    return train, validation


def train(recipe: Recipe, console: Console | None = None) -> TrainResult:
    """Train the adapter ``recipe`` describes; return where it was written and its metrics."""
    console = console or Console(stderr=True)
    # On CPU, accelerate only sets up gloo data parallelism (torchrun/accelerate launch) when told cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    output_dir = check_output_dir(recipe)
    check_store_name(recipe)
    if recipe.eval.tasks:
        from adapterhub.eval.run import check_before_training

        check_before_training(recipe)
    work_dir = work_dir_for(output_dir)
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
    trainer = AdapterTrainer(
        model=model,
        args=training_arguments(recipe, work_dir, device, has_eval=bool(eval_rows)),
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=collator,
        callbacks=[RichProgress(console)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    if state.is_main_process:
        initial = evaluate(model, tokenizer, collator, splits, eval_rows, recipe, seq2seq, generation=False)
    resume_from = get_last_checkpoint(str(work_dir / CHECKPOINTS)) if recipe.training.resume else None
    if recipe.training.resume and resume_from is None and state.is_main_process:
        console.print(f"[yellow]no checkpoint in {work_dir}; starting from scratch")
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    elapsed = time.perf_counter() - started
    if not state.is_main_process:
        state.wait_for_everyone()
        return TrainResult(output_dir, {})

    name, _ = split_random(recipe.model.name)
    params = count_parameters(model, untied_lm_head=checkpoint_unties_lm_head(model.get_base_model(), name))
    metrics: dict[str, Any] = {
        "method": recipe.method.type,
        "base_model": name,
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
    console.print(summary_table(f"trained {recipe.method.type} → {output_dir}", shown))
    if evaluation is not None:
        from adapterhub.eval.report import scores_table

        console.print(scores_table(evaluation))
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
        metrics["generation_accuracy"] = generation_accuracy(
            model, tokenizer, rows, seq2seq=seq2seq, batch_size=batch_size
        )
    model.train()
    return metrics


def write_output(
    model, recipe: Recipe, metrics: dict[str, Any], log_history: list[dict], output_dir: Path
) -> None:
    """Adapter files, resolved recipe, metrics, loss curve and model card, appearing all at once."""
    with atomic_dir(output_dir, replace=True) as tmp:
        model.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml())
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
                recipe_yaml=recipe.to_yaml(),
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
