"""Engine logprobs in OpenAI's two response shapes.

Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, where each
``top_logprobs`` entry maps token text to logprob for the chosen token and the ``logprobs`` most
likely ones (so up to ``logprobs + 1`` entries), and an echoed prompt's first token has ``null``s.
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``. A logprob of -inf
(a token a filter or grammar ruled out) is sent as -9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapterhub.runtime.api import TokenLogprob
from adapterhub.runtime.vocabulary import Vocabulary

FLOOR = -9999.0


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


class CompletionLogprobs:
    """Accumulates one completion choice's logprobs; ``text_offset`` counts from the first token."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.offset = 0

    def render(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        text = self.vocabulary.token_text
        body: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for token, entry in zip(token_ids, entries, strict=True):
            piece = text(token)
            body["tokens"].append(piece)
            body["text_offset"].append(self.offset)
            self.offset += len(piece)
            if entry is None:
                body["token_logprobs"].append(None)
                body["top_logprobs"].append(None)
                continue
            top = {piece: _value(entry.logprob)}
            for other, logprob in entry.top:
                top.setdefault(text(other), _value(logprob))
            body["token_logprobs"].append(_value(entry.logprob))
            body["top_logprobs"].append(top)
        return body


def chat_logprobs(vocabulary: Vocabulary, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = vocabulary.token_bytes(token)
        return {"token": vocabulary.token_text(token), "logprob": _value(logprob), "bytes": list(raw)}

    return [
        {**one(entry.token_id, entry.logprob), "top_logprobs": [one(token, lp) for token, lp in entry.top]}
        for entry in entries
    ]
