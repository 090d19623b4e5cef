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
class GrammarSpec:
    """A constraint on the generated text, compiled into per-step token masks (``runtime/grammar.py``).

    ``kind`` is ``json_schema`` (``text`` is the schema as JSON), ``regex``, ``choice`` (a JSON list
    of strings), ``lark`` or ``gbnf`` (a context-free grammar in either notation).
    """

    KINDS = ("json_schema", "regex", "choice", "lark", "gbnf")

    kind: str
    text: str


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decode loop; the defaults change nothing.

    Greedy when ``temperature == 0``; ``top_k`` 0 (or -1), ``top_p`` 1 and ``min_p`` 0 disable those
    filters. ``logit_bias`` (token id, bias), ``presence_penalty``, ``frequency_penalty``,
    ``repetition_penalty``, ``min_tokens``, ``ignore_eos`` and ``stop_token_ids`` mean what they mean
    in vLLM (see ``runtime/sampling.py``). ``logprobs`` asks for each generated token's logprob and
    the ``logprobs`` most likely alternatives; ``prompt_logprobs`` the same for every prompt token
    after the first; ``max_tokens`` may then be 0 to score a prompt without generating.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: GrammarSpec | None = None
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token and its logprob, and the ``top`` most likely tokens there, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    # (token id, decoded text delta), in order; with ``params.logprobs`` set, also the token's
    # ``TokenLogprob`` as a third argument.
    on_token: Callable[..., None] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS, a stop string or token, a finished grammar), "length" or "cancelled"
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when params.logprobs is set
    # One per prompt token, the first None (nothing predicts it), when params.prompt_logprobs is set.
    prompt_logprobs: list[TokenLogprob | None] | None = None
