"""The runtime's public types: what the server, chat and benchmarks hand to an ``Engine`` and get back.

The engine itself lives in ``adapterhub.runtime.engine``; this module has no torch imports so
front ends can type against it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adapterhub.errors import UserError

FAMILIES = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")


class RequestError(UserError):
    """One request cannot be served; the engine keeps serving the others.

    ``code`` is machine-readable so front ends can map it (the server to HTTP statuses).
    """

    CODES = (
        "unknown_adapter",
        "prompt_too_long",
        "bad_request",
        "incompatible_adapter",
        "unsupported_adapter",
        "slot_capacity",
        "corrupt_adapter",
        "cancelled",
        "overloaded",
    )

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when ``temperature == 0``; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    method: str  # one of FAMILIES
    source: str  # the spec it was registered from
    base_model: str
    rank: int | None = None  # LoRA rank
    num_virtual_tokens: int | None = None  # prompt families


@dataclass
class GenerationRequest:
    """One prompt for one adapter (``None`` is the base model)."""

    prompt: str | list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_token: Callable[[int, str], None] | None = None  # (token id, decoded text delta), in order


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
