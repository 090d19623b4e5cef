"""The tokenizer's vocabulary as the decode loop and its clients see it: each logit column's bytes.

Built once per engine, on first use (a 150k-token vocabulary takes about a second): grammars need
llguidance's view of the tokenizer, and logprobs need each token's text and bytes.
"""

from __future__ import annotations

import threading
from typing import Any


class Vocabulary:
    """``size`` logit columns; ``token_bytes(i)`` is what token ``i`` adds to the text.

    Byte-level BPE and SentencePiece byte-fallback tokens are partial UTF-8 sequences on their own,
    so ``token_text`` may hold U+FFFD where ``token_bytes`` keeps the exact bytes (OpenAI's
    ``bytes`` field exists for exactly this). Special tokens are their own text (``</s>``).
    """

    def __init__(self, tokenizer: Any, size: int, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self.eos_ids = eos_ids
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._bytes: list[bytes] | None = None
        self._texts: list[str] | None = None

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's tokenizer over the same ``size`` columns, EOS being the engine's EOS ids."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.size, eos_token=sorted(self.eos_ids) or None
                )
            return self._ll_tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        return self._tables()[0][token_id]

    def token_text(self, token_id: int) -> str:
        return self._tables()[1][token_id]

    def _tables(self) -> tuple[list[bytes], list[str]]:
        if self._bytes is None:
            ll_tokenizer = self.ll_tokenizer
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            names = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            table = []
            for token_id in range(self.size):
                if token_id in special or ll_tokenizer.is_special_token(token_id):
                    name = names[token_id] if token_id < len(names) else None
                    table.append((name or "").encode())
                else:
                    table.append(ll_tokenizer.decode_bytes([token_id]))
            texts = [raw.decode("utf-8", errors="replace") for raw in table]
            with self._lock:
                self._bytes, self._texts = table, texts
        assert self._texts is not None
        return self._bytes, self._texts
