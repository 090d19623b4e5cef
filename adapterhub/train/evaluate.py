"""Validation metrics: loss and perplexity, and for label-style data accuracy teacher-forced and greedy.

Greedy (generation) accuracy never depends on how rows are batched: see ``generation_accuracy``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from adapterhub.errors import UserError
from adapterhub.models import ModelSpec, load_config, split_random
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


def generation_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    seq2seq: bool,
    batch_size: int,
    base: ModelSpec | None = None,
) -> float:
    """Share of rows whose greedy continuation, stripped, equals the stripped completion.

    No row's answer depends on which rows share its batch. PEFT puts prompt-learning virtual tokens
    before the pads of a left-padded batch, so a padded row would see pads between its virtual tokens
    and its prompt and answer differently than alone. So a base the runtime serves (``base``) is scored
    through the Engine, exactly as ``adapterhub serve`` answers: ragged prompts batched without pads.
    Otherwise a causal row shares a batch only with prompts of its own length, and seq2seq prompts are
    right-padded, where pads follow every real encoder token.
    """
    texts = generated_texts(model, tokenizer, rows, seq2seq=seq2seq, batch_size=batch_size, base=base)
    return share_correct(texts, rows)


def generated_texts(
    model,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    *,
    seq2seq: bool,
    batch_size: int,
    base: ModelSpec | None = None,
) -> list[str]:
    """Each row's greedy continuation, batched as ``generation_accuracy`` explains."""
    if base is not None and served_by_engine(base):
        with tempfile.TemporaryDirectory(prefix="adapterhub-eval-") as folder:
            model.save_pretrained(folder)
            return served_texts(base, tokenizer, rows, folder, batch_size=batch_size)
    return _peft_texts(model, tokenizer, rows, seq2seq=seq2seq, batch_size=batch_size)


def served_by_engine(base: ModelSpec) -> bool:
    """True for a base with real weights (not random) that a fast-runtime family describes."""
    from adapterhub.runtime.families import serves

    name, random_prefix = split_random(base.name)
    if random_prefix or base.random_init:
        return False
    try:
        return serves(load_config(name))
    except UserError:
        return False


def served_texts(
    base: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    adapter: str | None,
    *,
    batch_size: int,
) -> list[str]:
    """Greedy answers of ``adapter`` (a PEFT folder; None: the base alone) as the Engine serves them."""
    from adapterhub.runtime.api import GenerationRequest, SamplingParams
    from adapterhub.runtime.engine import Engine, EngineConfig

    max_new = _max_new_tokens(tokenizer, rows)
    longest = max(len(tokenizer(row["prompt"]).input_ids) for row in rows)
    rank, virtual = _slot_sizes(adapter)
    engine = Engine(
        EngineConfig(
            base=base.name,
            quantization=base.quantization,
            dtype=base.dtype,
            device=base.device,
            max_adapters=1,
            max_lora_rank=rank,
            max_batch_size=batch_size,
            max_queue=len(rows),
            max_context=longest + virtual + max_new + 1,
            max_virtual_tokens=virtual,
        )
    )
    name = None
    if adapter is not None:
        name = engine.register("evaluated", adapter).name
    params = SamplingParams(max_tokens=max_new, temperature=0.0)
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(row["prompt"], name, params)) for row in rows]
        return [handle.result().text for handle in handles]
    finally:
        engine.stop()


def _slot_sizes(adapter: str | None) -> tuple[int, int]:
    """The LoRA rank and virtual-token count the engine's slots need for ``adapter`` (at least 1)."""
    if adapter is None:
        return 1, 1
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    ranks = [config.get("r") or 1, *(config.get("rank_pattern") or {}).values()]
    rank = max(ranks) if config.get("peft_type") == "LORA" else 1
    return rank, config.get("num_virtual_tokens") or 1


def _max_new_tokens(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> int:
    return max(len(tokenizer(row["completion"], add_special_tokens=False).input_ids) for row in rows) + 2


def share_correct(texts: list[str], rows: list[dict[str, Any]]) -> float:
    hits = sum(text.strip() == row["completion"].strip() for text, row in zip(texts, rows, strict=True))
    return hits / len(rows)


@torch.no_grad()
def _peft_texts(
    model, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], *, seq2seq: bool, batch_size: int
) -> list[str]:
    """PEFT's ``generate``, batched so that no pad sits before a causal row's prompt tokens."""
    model.eval()
    device = next(p for p in model.parameters()).device
    max_new = _max_new_tokens(tokenizer, rows)
    if seq2seq:
        groups = [list(range(len(rows)))]
    else:
        by_length: dict[int, list[int]] = {}
        for index, row in enumerate(rows):
            by_length.setdefault(len(tokenizer(row["prompt"]).input_ids), []).append(index)
        groups = list(by_length.values())
    texts: dict[int, str] = {}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for group in groups:
            for chunk in batches(group, batch_size):
                prompts = [rows[index]["prompt"] for index in chunk]
                encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
                output = model.generate(
                    **encoded, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                if not seq2seq:
                    output = output[:, encoded["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(output, skip_special_tokens=True)
                texts.update(zip(chunk, decoded, strict=True))
    finally:
        tokenizer.padding_side = padding_side
    return [texts[index] for index in range(len(rows))]
