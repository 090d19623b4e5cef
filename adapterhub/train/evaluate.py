"""Validation metrics: loss and perplexity, and for label-style data accuracy teacher-forced and greedy."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adapterhub.train.data import IGNORE, Collator


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def teacher_forced(
    model, collator: Collator, examples: list[dict], *, seq2seq: bool, batch_size: int
) -> dict[str, float]:
    """Mean loss over label tokens, and the share of rows whose every label token is the argmax."""
    model.eval()
    device = next(p for p in model.parameters()).device
    loss_sum = tokens = correct = steps = 0
    start = time.perf_counter()
    for chunk in batches(examples, batch_size):
        batch = {key: value.to(device) for key, value in collator(chunk).items()}
        logits = model(**batch).logits.float()
        labels = batch["labels"]
        if not seq2seq:
            # Prompt-learning methods prepend virtual tokens to the logits; labels align with the tail.
            logits, labels = logits[:, -labels.shape[1] :][:, :-1], labels[:, 1:]
        mask = labels != IGNORE
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        loss_sum += loss.item()
        tokens += int(mask.sum())
        hits = (logits.argmax(-1) == labels) | ~mask
        correct += int(hits.all(dim=1).sum())
        steps += 1
    elapsed = time.perf_counter() - start
    eval_loss = loss_sum / max(tokens, 1)
    return {
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50.0)),
        "accuracy": correct / max(len(examples), 1),
        "eval_it_s": steps / elapsed if elapsed else 0.0,
    }


@torch.no_grad()
def generation_accuracy(
    model, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *, seq2seq: bool, batch_size: int
) -> float:
    """Share of rows whose greedy continuation, stripped, equals the stripped completion."""
    model.eval()
    device = next(p for p in model.parameters()).device
    max_new = max(len(tokenizer(row["completion"], add_special_tokens=False).input_ids) for row in rows) + 2
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right" if seq2seq else "left"
    correct = 0
    try:
        for chunk in batches(rows, batch_size):
            encoded = tokenizer([row["prompt"] for row in chunk], return_tensors="pt", padding=True).to(
                device
            )
            output = model.generate(
                **encoded, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            if not seq2seq:
                output = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(output, skip_special_tokens=True)
            correct += sum(
                text.strip() == row["completion"].strip() for text, row in zip(texts, chunk, strict=True)
            )
    finally:
        tokenizer.padding_side = padding_side
    return correct / len(rows)
