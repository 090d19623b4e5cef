"""``adapterhub bench train``: the seed table's columns for each recipe, as JSON or a rich table.

Each recipe is trained for a few steps through the same Trainer set-up as ``adapterhub train``
(precision, optimizer, checkpointing), timing only the steps after a warm-up. ``--random`` builds the
model from its config with random weights and feeds fixed-shape synthetic batches (input
``data.max_length`` tokens, ``--label-tokens`` labels), so no download is needed; accuracy is then
"n/a". ``--baseline`` also runs each recipe the way plain PEFT does by default (fp32 weights, fp32
compute, unfused AdamW) on the same machine and reports the speed-up.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, default_data_collator
from transformers.trainer_callback import PrinterCallback

from adapterhub.errors import UserError
from adapterhub.models import is_seq2seq, load_tokenizer
from adapterhub.recipe import Recipe, load_recipe
from adapterhub.train.data import Tokenize, load_splits
from adapterhub.train.evaluate import generation_accuracy, teacher_forced
from adapterhub.train.peft_model import build_peft_model, checkpoint_unties_lm_head, count_parameters
from adapterhub.train.trainer import peak_memory_mib, precision_flags, tokenized, training_arguments

BASELINE = {"dtype": "float32", "precision": "fp32", "optim": "adamw_torch"}


class StepClock(TrainerCallback):
    """Times the optimizer steps after ``warmup`` (the first steps pay for allocation and autotuning)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.stopped, self.timed_steps = warmup, 0.0, 0.0, 0

    def on_step_end(self, args, state, control, **_: Any):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.started = time.perf_counter()
        elif state.global_step > self.warmup:
            self.stopped, self.timed_steps = time.perf_counter(), state.global_step - self.warmup

    @property
    def it_s(self) -> float:
        return self.timed_steps / (self.stopped - self.started) if self.timed_steps else 0.0


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


def bench_recipe(
    recipe: Recipe, *, random: bool, steps: int, warmup: int, eval_batches: int, label_tokens: int
) -> dict[str, Any]:
    if random:
        recipe = replace(recipe, model=replace(recipe.model, random_init=True))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model = build_peft_model(recipe)
    device = next(model.parameters()).device
    seq2seq = is_seq2seq(model.config)
    batch_size = recipe.training.batch_size
    eval_count = eval_batches * (recipe.training.eval_batch_size or batch_size)
    if random:
        vocab = model.get_input_embeddings().num_embeddings
        shape = {
            "length": recipe.data.max_length,
            "vocab_size": vocab,
            "label_tokens": label_tokens,
            "seq2seq": seq2seq,
        }
        train_rows = synthetic_rows(count=(steps + warmup) * batch_size, seed=0, **shape)
        eval_rows = synthetic_rows(count=eval_count, seed=1, **shape)
        collator, splits, tokenizer = default_data_collator, None, None
    else:
        tokenizer = load_tokenizer(recipe.model.name)
        splits = load_splits(recipe.data)
        tokenize = Tokenize(tokenizer, recipe.data, seq2seq=seq2seq)
        train_rows, eval_rows = tokenized(splits, tokenize, eval_count)
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

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
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            data_collator=collator,
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    peak = peak_memory_mib(device)

    flags = precision_flags(recipe.training.precision, device)
    autocast_dtype = torch.bfloat16 if flags["bf16"] else torch.float16
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=flags["bf16"] or flags["fp16"]):
        evaluation = teacher_forced(
            model,
            collator,
            eval_rows,
            seq2seq=seq2seq,
            batch_size=recipe.training.eval_batch_size or batch_size,
        )
        accuracy: float | str = "n/a"
        if splits is not None and splits.labels is not None:
            accuracy = generation_accuracy(
                model, tokenizer, splits.validation[:eval_count], seq2seq=seq2seq, batch_size=batch_size
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
    }
    del trainer, model
    free_memory()
    return result


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def baseline_of(recipe: Recipe) -> Recipe:
    return replace(
        recipe,
        model=replace(recipe.model, dtype=BASELINE["dtype"]),
        training=replace(recipe.training, precision=BASELINE["precision"], optim=BASELINE["optim"]),
    )


@click.command("train")
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override, repeatable.")
@click.option("--random", "random_weights", is_flag=True, help="Random weights and synthetic batches.")
@click.option("--steps", default=20, show_default=True, help="Timed training steps.")
@click.option("--warmup", default=3, show_default=True, help="Untimed first steps.")
@click.option("--eval-batches", default=10, show_default=True)
@click.option("--label-tokens", default=3, show_default=True, help="Label length of synthetic batches.")
@click.option(
    "--baseline", is_flag=True, help="Also run each recipe in plain-PEFT fp32 and report the speed-up."
)
@click.option("--json", "as_json", is_flag=True)
def bench_train(
    recipes: tuple[str, ...],
    overrides: tuple[str, ...],
    random_weights: bool,
    steps: int,
    warmup: int,
    eval_batches: int,
    label_tokens: int,
    baseline: bool,
    as_json: bool,
) -> None:
    """Train each RECIPE briefly and report params, peak memory, train/eval it/s and accuracy."""
    console = Console(stderr=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for path in recipes:
        recipe = load_recipe(path, overrides)
        kwargs = {
            "random": random_weights,
            "steps": steps,
            "warmup": warmup,
            "eval_batches": eval_batches,
            "label_tokens": label_tokens,
        }
        with console.status(f"benchmarking {path}"):
            result = {"recipe": path, **bench_recipe(recipe, **kwargs)}
            if baseline:
                plain = bench_recipe(baseline_of(recipe), **kwargs)
                result["baseline_train_it_s"] = plain["train_it_s"]
                result["baseline_peak_memory_mib"] = plain["peak_memory_mib"]
                result["speedup"] = (
                    round(result["train_it_s"] / plain["train_it_s"], 2) if plain["train_it_s"] else None
                )
        results.append(result)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "random_weights": random_weights,
        "steps": steps,
        "results": results,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    Console().print(results_table(report))


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
