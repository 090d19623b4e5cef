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
    ``bytes`` field exists for exactly this). Special tokens are their own name (``</s>``); columns
    past the tokenizer's last token are named ``<|unused_N|>``, and a grammar never allows them.
    """

    def __init__(self, tokenizer: Any, size: int, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.size = size
        self.eos_ids = eos_ids
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._bytes: list[bytes] = []
        self._texts: list[str] = []
        self._special: list[int] = []

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's tokenizer over the same ``size`` columns, EOS being the engine's EOS ids.

        Built from this vocabulary's own token bytes: llguidance's Hugging Face import treats every
        added token as special, and a non-special added token such as Qwen's ``<tool_call>`` must be
        plain text to a grammar.
        """
        self._build()
        return self._ll_tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        self._build()
        return self._bytes[token_id]

    def token_text(self, token_id: int) -> str:
        self._build()
        return self._texts[token_id]

    def _build(self) -> None:
        with self._lock:
            if self._ll_tokenizer is not None:
                return
            import llguidance
            import llguidance.hf

            eos = sorted(self.eos_ids) or None
            imported = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.size, eos_token=eos)
            known = len(self.tokenizer)
            special = set(getattr(self.tokenizer, "all_special_ids", ()))
            names = self.tokenizer.convert_ids_to_tokens(list(range(known)))
            table, marked = [], []
            for token_id in range(self.size):
                if token_id >= known:
                    table.append(f"<|unused_{token_id}|>".encode())
                    marked.append(token_id)
                elif token_id in special:
                    table.append(str(names[token_id]).encode())
                    marked.append(token_id)
                else:
                    table.append(imported.decode_bytes([token_id]))
            wrapper = llguidance.TokenizerWrapper(_Tokens(self.tokenizer, table, marked, eos))
            self._bytes, self._special = table, marked
            self._texts = [raw.decode("utf-8", errors="replace") for raw in table]
            self._ll_tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.size, eos_token=eos)


class _Tokens:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, special ids, EOS and an encoder."""

    def __init__(self, tokenizer: Any, table: list[bytes], special: list[int], eos: list[int] | None) -> None:
        self.tokenizer = tokenizer
        self.tokens = table
        self.special_token_ids = special
        self.eos_token_id = eos[0] if eos else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
