"""A small synthetic language: the words behind the tiny tokenizer and the quickstart dataset.

Everything is generated from these lists with a fixed seed, so no third-party text ships with
adapterhub and every build is byte-for-byte reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["great", "good", "fast", "friendly", "clean", "lovely", "excellent", "helpful", "fresh", "happy"]
NEGATIVE = ["bad", "slow", "rude", "dirty", "awful", "broken", "terrible", "noisy", "stale", "angry"]
NEUTRAL = ["okay", "average", "plain", "usual", "normal", "standard", "fine", "typical", "regular", "common"]
SUBJECTS = ["service", "food", "room", "staff", "price", "delivery", "music", "coffee", "screen", "battery"]
FILLER = ["the", "was", "and", "very", "quite", "really", "a", "bit", "today", "overall", "is", "it"]
LABELS = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
CHAT_LINES = [
    "hello how are you",
    "tell me about the review",
    "what is the sentiment of this text",
    "thank you that is helpful",
    "you are a helpful assistant",
]


def review(rng: random.Random, label: str) -> str:
    words = LABELS[label]
    subject, adverb = rng.choice(SUBJECTS), rng.choice(FILLER[3:6])
    return f"the {subject} was {adverb} {rng.choice(words)} and {rng.choice(words)}"


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion rows of a 3-label sentiment task that a tiny model can learn in seconds."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(LABELS))
        rows.append({"prompt": f"Review: {review(rng, label)}\nSentiment:", "completion": f" {label}"})
    return rows


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE tokenizer is trained on: every word above in the shapes it appears in."""
    rng = random.Random(1234)
    lines = [" ".join(words) for words in (POSITIVE, NEGATIVE, NEUTRAL, SUBJECTS, FILLER)]
    lines += CHAT_LINES + [row["prompt"] + row["completion"] for row in sentiment_rows(400, seed=99)]
    lines += [" ".join(rng.sample(POSITIVE + NEGATIVE + SUBJECTS + FILLER, 8)) for _ in range(200)]
    return lines


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
