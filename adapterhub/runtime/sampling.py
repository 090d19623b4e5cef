"""Per-row logits processing and sampling for the engine's batch: every row its own parameters.

The parameters live in tables indexed by batch row, written once when a request takes its row
(``seat``), so a step gathers them with one index per table instead of rebuilding them per token.
A processor whose feature no seated row uses is skipped; one that some row uses runs over the
whole batch, the other rows holding neutral values. The order is vLLM's:

1. grammar masks (``runtime/grammar.py``): disallowed tokens get -inf;
2. ``min_tokens``: EOS and ``stop_token_ids`` get -inf until the row has that many tokens;
3. ``logit_bias``: added to the logits;
4. penalties: ``repetition_penalty`` divides positive and multiplies negative logits of every token
   seen in the prompt or the output; ``frequency_penalty`` subtracts itself times the token's count
   in the output, ``presence_penalty`` itself once per token present in the output;
5. greedy rows (``temperature == 0``) take the argmax here;
6. sampling rows: divide by temperature, drop tokens below ``min_p`` times the top probability,
   keep the ``top_k`` best and the smallest set reaching ``top_p``, then race exponential noise
   (Gumbel-max). A seeded row draws its noise from its own generator, so its tokens do not
   depend on its batch companions.

Logprobs are the log-softmax of the logits the row chose from: after steps 1–4 for greedy rows,
after step 6's filters (and temperature) for sampling rows — vLLM's ``processed_logprobs`` mode.
Prompt logprobs come from the raw logits: no processor applies to a prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from adapterhub.runtime.api import RequestError, SamplingParams, TokenLogprob
from adapterhub.runtime.grammar import GrammarMasks

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI allows 20 for chat, 5 for completions


class Row(Protocol):
    """What the sampler reads of a running request (the engine's ``RequestHandle``)."""

    row: int
    params: SamplingParams
    generator: torch.Generator | None
    matcher: Any  # an llguidance matcher, or None


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Refuse, with one line naming it, any parameter outside what it can mean."""
    in_vocab = all(0 <= token < vocab_size for token in params.stop_token_ids)
    biased = all(0 <= token < vocab_size for token, _ in params.logit_bias)
    problems = [
        (params.max_tokens < 0, f"max_tokens {params.max_tokens}: use 1 or more"),
        (
            params.max_tokens == 0 and params.prompt_logprobs is None,
            "max_tokens 0: only with prompt logprobs (echo), which score the prompt alone",
        ),
        (params.temperature < 0, f"temperature {params.temperature}: use 0 (greedy) or more"),
        (
            params.seed is not None and not -(2**63) <= params.seed < 2**64,
            f"seed {params.seed}: use an integer from -2**63 to 2**64 - 1",
        ),
        (not 0 < params.top_p <= 1, f"top_p {params.top_p}: use a value in (0, 1]"),
        (params.top_k < -1, f"top_k {params.top_k}: use 0 or -1 (off) or more"),
        (not 0 <= params.min_p <= 1, f"min_p {params.min_p}: use a value in [0, 1]"),
        (params.min_tokens < 0, f"min_tokens {params.min_tokens}: use 0 or more"),
        (
            params.min_tokens > max(params.max_tokens, 0),
            f"min_tokens {params.min_tokens} is above max_tokens {params.max_tokens}",
        ),
        (not -2 <= params.presence_penalty <= 2, f"presence_penalty {params.presence_penalty}: use [-2, 2]"),
        (
            not -2 <= params.frequency_penalty <= 2,
            f"frequency_penalty {params.frequency_penalty}: use [-2, 2]",
        ),
        (
            not 0 < params.repetition_penalty <= 2,
            f"repetition_penalty {params.repetition_penalty}: use (0, 2], 1 is off",
        ),
        (not biased, f"logit_bias has token ids outside the vocabulary (0..{vocab_size - 1})"),
        (
            not all(-100 <= bias <= 100 for _, bias in params.logit_bias),
            "logit_bias values must lie in [-100, 100]",
        ),
        (not in_vocab, f"stop_token_ids has ids outside the vocabulary (0..{vocab_size - 1})"),
        (
            params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS,
            f"logprobs {params.logprobs}: use 0 to {MAX_LOGPROBS}",
        ),
        (
            params.prompt_logprobs is not None and not 0 <= params.prompt_logprobs <= MAX_LOGPROBS,
            f"prompt logprobs {params.prompt_logprobs}: use 0 to {MAX_LOGPROBS}",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise RequestError(f"bad sampling parameter {message}", "bad_request")


class Sampler:
    """The per-row parameter tables of one engine's batch rows, and the step that samples them."""

    def __init__(self, max_rows: int, vocab_size: int, device: str, generator: torch.Generator) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.generator = generator  # unseeded rows' noise
        floats = dict(dtype=torch.float32, device=device)
        self.temperature = torch.zeros(max_rows, **floats)
        self.top_k = torch.full((max_rows,), vocab_size, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_rows, **floats)
        self.min_p = torch.zeros(max_rows, **floats)
        self.presence = torch.zeros(max_rows, **floats)
        self.frequency = torch.zeros(max_rows, **floats)
        self.repetition = torch.ones(max_rows, **floats)
        self.min_tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.generated = torch.zeros(max_rows, dtype=torch.long, device=device)
        # (rows × vocab) tables, allocated when a row first needs one.
        self.bias: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # output token counts
        self.seen: torch.Tensor | None = None  # prompt tokens
        self.stops: torch.Tensor | None = None  # tokens min_tokens holds back
        self.masks = GrammarMasks(vocab_size, max_rows, device)
        self.using: Counter[str] = Counter()  # seated rows per feature
        self._features: dict[int, set[str]] = {}

    # -- rows ------------------------------------------------------------------------------------

    def seat(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        constrained: bool,
        eos_ids: set[int],
    ) -> None:
        """Write ``row``'s parameters, neutral where the request asks nothing."""
        self.leave(row)
        features = {
            name
            for name, used in (
                ("sampling", params.temperature > 0),
                ("filters", params.top_k > 0 or params.top_p < 1 or params.min_p > 0),
                ("min_tokens", params.min_tokens > 0),
                ("bias", bool(params.logit_bias)),
                (
                    "penalties",
                    params.presence_penalty != 0
                    or params.frequency_penalty != 0
                    or params.repetition_penalty != 1,
                ),
                ("logprobs", params.logprobs is not None),
                ("grammar", constrained),
            )
            if used
        }
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k if params.top_k > 0 else self.vocab_size
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.repetition[row] = params.repetition_penalty
        self.min_tokens[row] = params.min_tokens
        self.generated[row] = 0
        for table in (self.bias, self.counts, self.seen, self.stops):
            if table is not None:
                table[row] = 0
        if "bias" in features:
            self.bias = self._table(self.bias, torch.float32)
            tokens, values = zip(*params.logit_bias, strict=True)
            self.bias[row, list(tokens)] = torch.tensor(values, device=self.device)
        if "penalties" in features:
            self.counts = self._table(self.counts, torch.float32)
            self.seen = self._table(self.seen, torch.bool)
            self.seen[row, list(prompt_ids)] = True
        if "min_tokens" in features:
            self.stops = self._table(self.stops, torch.bool)
            held = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
            self.stops[row, sorted(held)] = True
        self._features[row] = features
        self.using.update(features)

    def leave(self, row: int) -> None:
        self.using.subtract(self._features.pop(row, set()))

    def _table(self, table: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if table is None:
            rows = self.temperature.shape[0]
            table = torch.zeros(rows, self.vocab_size, dtype=dtype, device=self.device)
        return table

    # -- the step --------------------------------------------------------------------------------

    def sample(
        self, logits: torch.Tensor, requests: Sequence[Row]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token, and its logprobs where the row asked for them."""
        using = self.using
        rows = torch.tensor([r.row for r in requests], device=self.device)
        if using["grammar"]:
            constrained = [(i, r.matcher) for i, r in enumerate(requests) if r.matcher is not None]
            if constrained:
                self.masks.apply(logits, constrained)
        if using["min_tokens"]:
            assert self.stops is not None
            early = (self.generated[rows] < self.min_tokens[rows]).unsqueeze(1)
            logits = logits.masked_fill(self.stops[rows] & early, float("-inf"))
        if using["bias"]:
            assert self.bias is not None
            logits = logits + self.bias[rows]
        if using["penalties"]:
            logits = self._penalize(logits, rows)
        tokens = logits.argmax(dim=-1)
        chosen_from = logits
        if using["sampling"]:
            temperature = self.temperature[rows].unsqueeze(1)
            sampling = temperature > 0
            scaled = logits / torch.where(sampling, temperature, 1.0)
            if using["filters"]:
                scaled = self._filter(scaled, rows)
            noise = torch.empty_like(scaled).exponential_(generator=self.generator)
            for i, request in enumerate(requests):
                if request.generator is not None:
                    noise[i] = torch.empty(scaled.shape[-1], device=self.device).exponential_(
                        generator=request.generator
                    )
            drawn = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
            tokens = torch.where(sampling.squeeze(1), drawn, tokens)
            chosen_from = torch.where(sampling, scaled, logits)
        if using["penalties"] or using["min_tokens"]:
            self._count(rows, tokens)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        if not using["logprobs"]:
            return tokens.tolist(), logprobs
        wanted = [(i, r.params.logprobs) for i, r in enumerate(requests) if r.params.logprobs is not None]
        top = max(k for _, k in wanted)
        logprob = chosen_from.log_softmax(dim=-1)
        picked = logprob.gather(1, tokens.unsqueeze(1)).squeeze(1)
        best = logprob.topk(top, dim=-1) if top else None
        token_list, picked_list = tokens.tolist(), picked.tolist()
        best_ids = best.indices.tolist() if best is not None else None
        best_values = best.values.tolist() if best is not None else None
        for i, k in wanted:
            alternatives = ()
            if k and best_ids is not None and best_values is not None:
                alternatives = tuple(zip(best_ids[i][:k], best_values[i][:k], strict=True))
            logprobs[i] = TokenLogprob(token_list[i], picked_list[i], alternatives)
        return token_list, logprobs

    def _penalize(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert self.counts is not None and self.seen is not None
        counts = self.counts[rows]
        present = counts > 0
        repetition = self.repetition[rows].unsqueeze(1)
        repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(self.seen[rows] | present, repeated, logits)
        logits = logits - self.frequency[rows].unsqueeze(1) * counts
        return logits - self.presence[rows].unsqueeze(1) * present

    def _filter(self, scaled: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``scaled`` with min_p, then top_k, then top_p (over what is left) applied: dropped
        tokens get -inf. A row whose filters are off keeps every token exactly."""
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        rank = torch.arange(ordered.shape[-1], device=self.device).unsqueeze(0)
        keep = (probs >= self.min_p[rows].unsqueeze(1) * probs[:, :1]) & (
            rank < self.top_k[rows].unsqueeze(1)
        )
        top_p = self.top_p[rows].unsqueeze(1)
        left = ordered.masked_fill(~keep, -math.inf).softmax(dim=-1)
        keep &= (left.cumsum(dim=-1) - left < top_p) | (top_p >= 1)
        return torch.full_like(scaled, -math.inf).scatter(1, order, ordered.masked_fill(~keep, -math.inf))

    def _count(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        self.generated[rows] += 1
        if self.counts is not None:
            self.counts[rows, tokens] += 1


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Logprobs of ``prompt_ids[1:]`` from the raw ``logits`` of the positions before each, with the
    ``top`` most likely tokens there; the first prompt token has none."""
    logprob = logits.float().log_softmax(dim=-1)
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    picked = logprob.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    out: list[TokenLogprob | None] = [None]
    best = logprob.topk(top, dim=-1) if top else None
    best_ids = best.indices.tolist() if best is not None else [[]] * len(picked)
    best_values = best.values.tolist() if best is not None else [[]] * len(picked)
    for token, value, ids, values in zip(prompt_ids[1:], picked, best_ids, best_values, strict=True):
        out.append(TokenLogprob(token, value, tuple(zip(ids, values, strict=True))))
    return out
