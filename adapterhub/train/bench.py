"""``adapterhub bench train``: the seed table's columns for each recipe, as JSON or a rich table.

Each recipe is trained for a few steps through the same Trainer set-up as ``adapterhub train``
(precision, optimizer, checkpointing), timing only the steps after a warm-up. ``--random`` builds the
model from its config with random weights and feeds fixed-shape synthetic batches (input
``data.max_length`` tokens, ``--label-tokens`` labels), so no download is needed; accuracy is then
"n/a". ``--baseline`` also trains each recipe the way PEFT's own examples do (fp32 weights and compute,
torch AdamW, a plain PyTorch loop without Trainer) on the same machine and reports the speed-up.

``--full`` trains each recipe as ``adapterhub train`` does instead (its own length, its output folder
written), so accuracy is that of the finished adapter. ``--test FILE`` scores accuracy by generation on
held-out rows rather than the validation split, and ``--zero-shot`` adds the base model alone, with the
same prompts, as a first row. Generation accuracy is computed as ``serve`` answers (see
``adapterhub.train.evaluate.generation_accuracy``). On Linux the peak memory of each row is its own:
the process's peak resident set is reset before each recipe.

Timing synchronizes the device only at the ends of the timed window, never per step: a per-step
sync would stop the CPU from queueing the next step's kernels while the GPU runs this one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from transformers import (
    PreTrainedTokenizerBase,
    TrainerCallback,
    default_data_collator,
    get_linear_schedule_with_warmup,
)
from transformers.trainer_callback import PrinterCallback

from adapterhub.errors import UserError
from adapterhub.models import is_seq2seq, load_model, load_tokenizer
from adapterhub.recipe import Recipe, load_recipe
from adapterhub.train.data import Collator, Splits, Tokenize, collator_for, load_splits, normalize, read_file
from adapterhub.train.evaluate import (
    generation_accuracy,
    served_by_engine,
    served_texts,
    share_correct,
    teacher_forced,
)
from adapterhub.train.peft_model import (
    build_peft_model,
    checkpoint_unties_lm_head,
    count_parameters,
    model_spec,
)
from adapterhub.train.trainer import (
    AdapterTrainer,
    compile_errors,
    peak_memory_mib,
    precision_flags,
    reset_peak_memory,
    tokenized,
    training_arguments,
)
from adapterhub.train.trainer import train as train_recipe


class StepClock(TrainerCallback):
    """Times the optimizer steps after ``warmup`` (the first steps pay for compilation and allocation)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.warmup_s, self.it_s = warmup, 0.0, 0.0
        self.began = self.started = 0.0

    def on_train_begin(self, args, state, control, **_: Any):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **_: Any):
        if state.global_step == self.warmup:
            synchronize()
            self.started = time.perf_counter()
            self.warmup_s = self.started - self.began
        elif state.global_step == state.max_steps:
            synchronize()
            self.it_s = (state.global_step - self.warmup) / (time.perf_counter() - self.started)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic_rows(
    length: int, vocab_size: int, count: int, label_tokens: int, *, seq2seq: bool, seed: int
) -> list[dict]:
    """Fixed-shape random rows: ``length`` inputs, ``label_tokens`` labels (a causal row's last tokens)."""
    if label_tokens >= length:
        raise UserError(f"--label-tokens {label_tokens} must be below data.max_length {length}")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (count, length), generator=generator).tolist()
    labels = torch.randint(3, vocab_size, (count, label_tokens), generator=generator).tolist()
    rows = []
    for row_ids, row_labels in zip(ids, labels, strict=True):
        if seq2seq:
            rows.append({"input_ids": row_ids, "attention_mask": [1] * length, "labels": row_labels})
        else:
            prompt = row_ids[: length - label_tokens]
            rows.append(
                {
                    "input_ids": prompt + row_labels,
                    "attention_mask": [1] * length,
                    "labels": [-100] * len(prompt) + row_labels,
                }
            )
    return rows


@dataclass
class BenchData:
    train_rows: list[dict]
    eval_rows: list[dict]
    collator: Collator
    splits: Splits | None = None  # real data only: accuracy needs the label names
    tokenizer: PreTrainedTokenizerBase | None = None


def bench_data(
    recipe: Recipe,
    model: PeftModel,
    *,
    random: bool,
    train_count: int,
    eval_count: int,
    label_tokens: int,
    fixed_shape: bool,
) -> BenchData:
    """Synthetic fixed-shape rows for random weights, else the recipe's data tokenized as ``train`` does."""
    seq2seq = is_seq2seq(model.config)
    if random:
        shape = {
            "length": recipe.data.max_length,
            "vocab_size": model.get_input_embeddings().num_embeddings,
            "label_tokens": label_tokens,
            "seq2seq": seq2seq,
        }
        return BenchData(
            synthetic_rows(count=train_count, seed=0, **shape),
            synthetic_rows(count=eval_count, seed=1, **shape),
            default_data_collator,
        )
    tokenizer = load_tokenizer(recipe.model.name)
    splits = load_splits(recipe.data)
    train_rows, eval_rows = tokenized(splits, Tokenize(tokenizer, recipe.data, seq2seq=seq2seq), eval_count)
    collator = collator_for(tokenizer, recipe.data, seq2seq=seq2seq, fixed_shape=fixed_shape)
    return BenchData(train_rows, eval_rows, collator, splits, tokenizer)


def bench_recipe(
    recipe: Recipe,
    *,
    random: bool,
    steps: int,
    warmup: int,
    eval_batches: int,
    label_tokens: int,
    test_rows: list[dict] | None = None,
) -> dict[str, Any]:
    model = build_peft_model(recipe)
    device = next(model.parameters()).device
    seq2seq = is_seq2seq(model.config)
    batch_size = recipe.training.batch_size
    eval_count = eval_batches * (recipe.training.eval_batch_size or batch_size)
    data = bench_data(
        recipe,
        model,
        random=random,
        train_count=(steps + warmup) * batch_size,
        eval_count=eval_count,
        label_tokens=label_tokens,
        fixed_shape=recipe.training.compile,
    )

    clock = StepClock(warmup)
    with tempfile.TemporaryDirectory(prefix="adapterhub-bench-") as work:
        timed = replace(
            recipe,
            training=replace(
                recipe.training,
                max_steps=steps + warmup,
                save_steps=10**9,
                logging_steps=10**9,
                eval_steps=None,
            ),
        )
        args = training_arguments(timed, Path(work), device, has_eval=False)
        args.save_strategy = "no"
        trainer = AdapterTrainer(
            model=model,
            args=args,
            train_dataset=data.train_rows,
            data_collator=data.collator,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        with compile_errors():
            trainer.train()
    peak = peak_memory_mib(device)

    flags = precision_flags(recipe.training.precision, device)
    autocast_dtype = torch.bfloat16 if flags["bf16"] else torch.float16
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=flags["bf16"] or flags["fp16"]):
        evaluation = teacher_forced(
            model,
            data.collator,
            data.eval_rows,
            seq2seq=seq2seq,
            batch_size=recipe.training.eval_batch_size or batch_size,
        )
        accuracy: float | str = "n/a"
        if data.splits is not None and data.splits.labels is not None:
            accuracy = generation_accuracy(
                model,
                data.tokenizer,
                test_rows or data.splits.validation[:eval_count],
                seq2seq=seq2seq,
                batch_size=batch_size,
                base=model_spec(recipe, str(device)),
            )
    params = count_parameters(
        model, untied_lm_head=checkpoint_unties_lm_head(model.get_base_model(), recipe.model.name)
    )
    result = {
        "method": recipe.method.type,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": round(params.percent, 3),
        "peak_memory_mib": round(peak, 1),
        "train_it_s": round(clock.it_s, 3),
        "eval_it_s": round(evaluation["eval_it_s"], 3),
        "accuracy": accuracy,
        "dtype": recipe.model.dtype,
        "precision": "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32",
        "optim": recipe.training.optim,
        "compile": recipe.training.compile_mode if recipe.training.compile else False,
        "warmup_s": round(clock.warmup_s, 1),
    }
    del trainer, model
    free_memory()
    return result


def bench_full(recipe: Recipe, test_rows: list[dict] | None, console: Console) -> dict[str, Any]:
    """Train ``recipe`` as ``adapterhub train`` does, then score the finished adapter on ``test_rows``."""
    started = time.perf_counter()
    result = train_recipe(recipe, console=console)
    metrics, model = result.metrics, result.model
    accuracy: float | str = metrics.get("generation_accuracy", "n/a")
    if test_rows is not None:
        device = next(model.parameters()).device
        accuracy = generation_accuracy(
            model,
            load_tokenizer(recipe.model.name),
            test_rows,
            seq2seq=is_seq2seq(model.config),
            batch_size=recipe.training.eval_batch_size or recipe.training.batch_size,
            base=model_spec(recipe, str(device)),
        )
    row = {
        "method": recipe.method.type,
        "trainable_params": metrics["trainable_params"],
        "total_params": metrics["total_params"],
        "trainable_percent": round(metrics["trainable_percent"], 3),
        "peak_memory_mib": metrics["peak_memory_mib"],
        "train_it_s": metrics["train_it_s"],
        "eval_it_s": round(metrics.get("eval_it_s", 0.0), 3),
        "accuracy": accuracy,
        "validation_generation_accuracy": metrics.get("generation_accuracy", "n/a"),
        "initial_validation_accuracy": metrics.get("initial_accuracy", "n/a"),
        "steps": metrics["steps"],
        "batch_size": recipe.training.batch_size,
        "train_loss": round(metrics["train_loss"], 4),
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "precision": recipe.training.precision,
        "output_dir": str(result.output_dir),
    }
    del result, model
    free_memory()
    return row


def zero_shot_row(recipe: Recipe, test_rows: list[dict] | None) -> dict[str, Any]:
    """The base model alone, greedy on the same prompts the adapters are scored on."""
    started = time.perf_counter()
    rows = test_rows or load_splits(recipe.data).validation[: recipe.training.eval_max_samples]
    tokenizer = load_tokenizer(recipe.model.name)
    spec = model_spec(recipe)
    batch_size = recipe.training.eval_batch_size or recipe.training.batch_size
    base = load_model(spec)
    total = count_parameters(base, untied_lm_head=checkpoint_unties_lm_head(base, recipe.model.name)).total
    if served_by_engine(spec):
        del base
        free_memory()
        accuracy = share_correct(served_texts(spec, tokenizer, rows, None, batch_size=batch_size), rows)
    else:
        accuracy = generation_accuracy(
            base, tokenizer, rows, seq2seq=is_seq2seq(base.config), batch_size=batch_size
        )
    return {
        "method": "zero-shot base",
        "trainable_params": 0,
        "total_params": total,
        "trainable_percent": 0.0,
        "peak_memory_mib": "n/a",
        "train_it_s": "n/a",
        "eval_it_s": "n/a",
        "accuracy": accuracy,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def read_test_rows(path: str | None, recipe: Recipe) -> list[dict] | None:
    """Held-out rows in the recipe's data format (its columns, labels and prompt template applied)."""
    if path is None:
        return None
    rows, fmt = normalize(read_file(Path(path)), recipe.data, path)
    if fmt != "prompt_completion":
        raise UserError(f"--test {path}: accuracy needs prompt/completion rows, found {fmt} rows")
    return rows


def plain_peft_baseline(
    recipe: Recipe, *, random: bool, steps: int, warmup: int, label_tokens: int
) -> dict[str, float]:
    """Train/it/s and peak memory of the loop PEFT's examples use: fp32, torch AdamW, no Trainer."""
    recipe = replace(recipe, model=replace(recipe.model, dtype="float32"))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = build_peft_model(recipe)
    device = next(model.parameters()).device
    batch_size = recipe.training.batch_size
    data = bench_data(
        recipe,
        model,
        random=random,
        train_count=(steps + warmup) * batch_size,
        eval_count=0,
        label_tokens=label_tokens,
        fixed_shape=True,  # PEFT's examples pad to max_length too
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.training.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps + warmup)
    loader = DataLoader(data.train_rows, batch_size=batch_size, shuffle=True, collate_fn=data.collator)
    model.train()
    started = 0.0
    for index, batch in enumerate(itertools.islice(itertools.cycle(loader), steps + warmup)):
        if index == warmup:
            synchronize()
            started = time.perf_counter()
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    synchronize()
    it_s = steps / (time.perf_counter() - started)
    peak = peak_memory_mib(device)
    del model, optimizer
    free_memory()
    return {"train_it_s": round(it_s, 3), "peak_memory_mib": round(peak, 1)}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc only: hand freed heap pages back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bench_recipes(
    paths: list[str],
    overrides: tuple[str, ...],
    *,
    random_weights: bool,
    steps: int,
    warmup: int,
    eval_batches: int,
    label_tokens: int,
    baseline: bool,
    full: bool,
    test_path: str | None,
    zero_shot: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Train each recipe (briefly, or fully with ``full``; with ``baseline`` also the plain-PEFT way)
    and score it; the report as a dict. ``zero_shot`` adds the base model alone as a first row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    recipes = [load_recipe(path, overrides) for path in paths]  # every recipe is checked before any runs
    if random_weights and (full or zero_shot or test_path):
        raise UserError("--random has no accuracy to score: drop --full, --test and --zero-shot with it")
    if zero_shot and len({recipe.model.name for recipe in recipes}) > 1:
        raise UserError("--zero-shot needs recipes of one base model (model.name): bench them separately")
    results = []
    started = time.perf_counter()
    if zero_shot:
        progress(f"scoring the base model {recipes[0].model.name} alone")
        results.append({"recipe": None, **zero_shot_row(recipes[0], read_test_rows(test_path, recipes[0]))})
    for index, (path, recipe) in enumerate(zip(paths, recipes, strict=True), start=1):
        if random_weights:
            recipe = replace(recipe, model=replace(recipe.model, random_init=True))
        reset_peak_memory(torch.device(device))
        test_rows = read_test_rows(test_path, recipe)
        if full:
            progress(f"[{index}/{len(paths)}] {path}: training in full, then scoring")
            results.append({"recipe": path, **bench_full(recipe, test_rows, Console(stderr=True))})
            continue
        progress(f"[{index}/{len(paths)}] {path}: {warmup} warm-up + {steps} timed steps")
        result = {
            "recipe": path,
            **bench_recipe(
                recipe,
                random=random_weights,
                steps=steps,
                warmup=warmup,
                eval_batches=eval_batches,
                label_tokens=label_tokens,
                test_rows=test_rows,
            ),
        }
        if baseline:
            progress(f"[{index}/{len(paths)}] {path}: plain-PEFT baseline")
            plain = plain_peft_baseline(
                recipe, random=random_weights, steps=steps, warmup=warmup, label_tokens=label_tokens
            )
            result["baseline_train_it_s"] = plain["train_it_s"]
            result["baseline_peak_memory_mib"] = plain["peak_memory_mib"]
            result["speedup"] = (
                round(result["train_it_s"] / plain["train_it_s"], 2) if plain["train_it_s"] else None
            )
        results.append(result)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "random_weights": random_weights,
        "steps": "each recipe's own" if full else steps,
        "test": test_path,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, and its core count."""
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def results_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"bench train on {report['device']}")
    columns = [
        "method",
        "total_params",
        "trainable_params",
        "peak_memory_mib",
        "train_it_s",
        "eval_it_s",
        "accuracy",
    ]
    if any("speedup" in row for row in report["results"]):
        columns += ["baseline_train_it_s", "speedup"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in report["results"]:
        table.add_row(*(f"{row[c]:,}" if isinstance(row[c], int) else str(row[c]) for c in columns))
    return table
