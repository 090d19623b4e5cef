"""Converting a checked PEFT adapter into the engine's native form, on the CPU tier, in the engine's dtype.

What an adapter means is decided by ``adapterhub.contract`` (PEFT's own module plan); this module
only reshapes the saved tensors:

- LoRA: per module ``A`` (rank × in) and ``B`` multiplied by PEFT's scaling (rank × out), so a row's
  delta is ``(x Aᵀ) B``; on the input embedding ``A`` is (vocab × rank), looked up by token id.
- DoRA: also the output-side scale ``m / ‖W + s·B·A‖`` per module, computed once here from the base
  weight (dequantized for a 4-bit base, as PEFT does).
- LoRA biases: ``lora_bias`` (``s·b`` on B) and the biases ``bias="all"``/``"lora_only"`` replace, as
  one additive vector per module (saved minus base).
- trainable tokens: the embedding rows an adapter replaces, with their token ids.
- IA3: per module one scale vector, applied to the input (feed-forward modules) or the output.
- prompt tuning and P-tuning: the virtual-token embeddings (PEFT saves P-tuning's prompt-encoder
  output, so its encoder has already been run once by ``save_pretrained``).
- prefix tuning: per-layer key/value blocks (PEFT saves the projected prefix, i.e. the encoder output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from adapterhub.contract import (
    PREFIX,
    AdapterFiles,
    BaseModules,
    ModulePlan,
    plan_for_base,
    read_adapter,
)
from adapterhub.runtime.api import RequestError


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must agree with: layer count, widths, and the modules the decoder adapts per row."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    targets: frozenset[str]  # linear modules with per-row LoRA/IA3/DoRA/bias: projections, output head
    embedding: str  # the input embedding (LoRA on it, trainable tokens)
    tied_output: str | None  # the output head, when it shares the embedding's weight


class BaseWeights(Protocol):
    """What the conversion reads of the loaded base (the decoder provides it)."""

    def dense_weight(self, module: str) -> torch.Tensor: ...

    def bias(self, module: str) -> torch.Tensor | None: ...

    def parameter(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenRows:
    """Embedding rows an adapter replaces (PEFT's trainable tokens)."""

    ids: tuple[int, ...]
    rows: torch.Tensor  # (tokens, hidden)
    tied: bool  # the tied output head's rows too


@dataclass
class NativeAdapter:
    """One adapter in engine-native form; module keys are the base's module names."""

    method: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (A, B·scaling)
    embedding_lora: tuple[torch.Tensor, torch.Tensor] | None = None  # (vocab × rank, rank × hidden)
    ia3: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)  # (vector, on input)
    dora: dict[str, torch.Tensor] = field(default_factory=dict)  # output-side scale
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # added to the output
    tokens: TokenRows | None = None
    virtual_tokens: torch.Tensor | None = None  # (n, hidden)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, kv heads, n, head dim)
    flat: torch.Tensor | None = None  # the one buffer all tensors view, once packed

    @property
    def rank(self) -> int | None:
        if self.method != "lora":
            return None
        ranks = [a.shape[0] for a, _ in self.lora.values()]
        if self.embedding_lora is not None:
            ranks.append(self.embedding_lora[0].shape[1])
        return max(ranks, default=0)

    @property
    def num_virtual_tokens(self) -> int | None:
        if self.virtual_tokens is not None:
            return self.virtual_tokens.shape[0]
        return self.prefix_kv.shape[3] if self.prefix_kv is not None else None

    @property
    def mergeable(self) -> bool:
        """Whether it folds into projection weights (embedding LoRA and trainable tokens do not)."""
        return self.method in ("lora", "ia3") and self.embedding_lora is None and self.tokens is None

    def tensors(self) -> list[torch.Tensor]:
        found = [t for pair in self.lora.values() for t in pair]
        found += list(self.embedding_lora or ())
        found += [v for v, _ in self.ia3.values()] + list(self.dora.values()) + list(self.bias.values())
        found += [] if self.tokens is None else [self.tokens.rows]
        return found + [t for t in (self.virtual_tokens, self.prefix_kv) if t is not None]

    def with_tensors(self, tensors: list[torch.Tensor], flat: torch.Tensor | None = None) -> NativeAdapter:
        """The same adapter with ``tensors`` (in ``tensors()`` order) in place of its own."""
        new = iter(tensors)
        return NativeAdapter(
            method=self.method,
            lora={key: (next(new), next(new)) for key in self.lora},
            embedding_lora=None if self.embedding_lora is None else (next(new), next(new)),
            ia3={key: (next(new), on_input) for key, (_, on_input) in self.ia3.items()},
            dora={key: next(new) for key in self.dora},
            bias={key: next(new) for key in self.bias},
            tokens=None if self.tokens is None else TokenRows(self.tokens.ids, next(new), self.tokens.tied),
            virtual_tokens=None if self.virtual_tokens is None else next(new),
            prefix_kv=None if self.prefix_kv is None else next(new),
            flat=flat,
        )

    def packed(self, dtype: torch.dtype, pin: bool) -> NativeAdapter:
        """All tensors as views of one flat CPU buffer, page-locked when ``pin`` (the CUDA CPU tier),
        so moving the adapter to the device is a single DMA."""
        tensors = self.tensors()
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin)
        views = _views(flat, tensors)
        torch._foreach_copy_(views, tensors)
        return self.with_tensors(views, flat)

    def to(self, device: str | torch.device) -> NativeAdapter:
        if self.flat is None:
            return self.with_tensors([t.to(device) for t in self.tensors()])
        flat = self.flat.to(device, non_blocking=True)
        return self.with_tensors(_views(flat, self.tensors()), flat)


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views


@dataclass(frozen=True)
class Capacity:
    """What one device slot holds."""

    max_rank: int
    max_virtual_tokens: int
    max_trainable_tokens: int


def load_native(
    folder: Path,
    base: BaseShape,
    modules: BaseModules,
    weights: BaseWeights,
    capacity: Capacity,
    *,
    dtype: torch.dtype,
    pin: bool,
) -> NativeAdapter:
    """Read and check a PEFT adapter folder against the base, then convert it into one packed
    CPU-tier buffer (page-locked when ``pin``)."""
    adapter = read_adapter(folder)
    plan = plan_for_base(adapter, modules)
    if adapter.method == "lora":
        native = _lora(adapter, plan, base, weights, capacity)
    elif adapter.method == "ia3":
        native = _ia3(adapter, plan, base)
    else:
        native = _prompt(adapter, base, capacity.max_virtual_tokens)
    return native.packed(dtype, pin=pin)


def _not_served(adapter: AdapterFiles, what: str) -> RequestError:
    return RequestError(
        f"adapter {adapter.label}: {what} is not served by the multi-adapter runtime: "
        "merge it into a standalone model with `adapterhub merge`, or serve it with plain PEFT",
        "unsupported_adapter",
    )


def _check_targets(adapter: AdapterFiles, modules: list[str], base: BaseShape) -> None:
    for module in modules:
        if module not in base.targets:
            raise _not_served(adapter, f"an adapter on '{module}'")


def _capacity(adapter: AdapterFiles, what: str, count: int, limit: int, setting: str) -> None:
    if count > limit:
        raise RequestError(
            f"adapter {adapter.label} has {what} {count} but slots hold {limit}: "
            f"start the engine with {setting} >= {count}",
            "slot_capacity",
        )


def _lora(
    adapter: AdapterFiles, plan: ModulePlan, base: BaseShape, weights: BaseWeights, capacity: Capacity
) -> NativeAdapter:
    saved = adapter.weights
    if plan.ties_adapters:
        raise _not_served(adapter, "ensure_weight_tying=True on a base with tied embeddings")
    for module, target in plan.lora.items():
        if target.kind not in ("linear", "embedding") or target.fan_in_fan_out:
            raise _not_served(adapter, f"LoRA on '{module}' ({target.kind}, as the base stores it)")
        if target.kind == "embedding" and target.use_dora:
            raise _not_served(adapter, f"DoRA on the embedding '{module}'")
    _check_targets(adapter, [m for m, t in plan.lora.items() if t.kind == "linear"], base)
    _check_targets(adapter, list(plan.biases), base)
    _check_base_copies(adapter, plan, weights)
    native = NativeAdapter(method="lora")
    for module, target in plan.lora.items():
        _capacity(adapter, "LoRA rank", target.rank, capacity.max_rank, "max_lora_rank")
        key = PREFIX + module
        if target.kind == "embedding":
            if module != base.embedding:
                raise _not_served(adapter, f"a LoRA on the embedding '{module}'")
            a, b = saved[f"{key}.lora_embedding_A"], saved[f"{key}.lora_embedding_B"]
            native.embedding_lora = (a.t(), b.t() * target.scaling)
            continue
        a, b = saved[f"{key}.lora_A.weight"], saved[f"{key}.lora_B.weight"]
        native.lora[module] = (a, b.t() * target.scaling)
        if target.lora_bias:
            native.bias[module] = saved[f"{key}.lora_B.bias"] * target.scaling
        if target.use_dora:
            native.dora[module] = _dora_scale(adapter, module, a, b * target.scaling, weights)
    for module in plan.biases:
        key = PREFIX + module
        replacement = saved.get(f"{key}.base_layer.bias", saved.get(f"{key}.bias"))
        original = weights.bias(module)
        delta = replacement if original is None else replacement - original.detach().float().cpu()
        native.bias[module] = native.bias[module] + delta if module in native.bias else delta
    if plan.trainable_tokens is not None:
        native.tokens = _token_rows(adapter, plan, base, capacity)
    return native


def _dora_scale(
    adapter: AdapterFiles, module: str, a: torch.Tensor, scaled_b: torch.Tensor, weights: BaseWeights
) -> torch.Tensor:
    """PEFT's ``m / ‖W + s·B·A‖`` (norm over each output row), on the base as it is served."""
    from adapterhub.errors import UserError

    try:
        weight = weights.dense_weight(module).float()
    except UserError as err:
        raise RequestError(
            f"adapter {adapter.label} uses DoRA, which needs the base weight: {err}", "unsupported_adapter"
        ) from err
    combined = weight + (scaled_b.to(weight.device).float() @ a.to(weight.device).float())
    magnitude = adapter.weights[f"{PREFIX}{module}.lora_magnitude_vector"].float()
    return (magnitude / torch.linalg.norm(combined, dim=1).cpu()).flatten()


def _token_rows(adapter: AdapterFiles, plan: ModulePlan, base: BaseShape, capacity: Capacity) -> TokenRows:
    tokens = plan.trainable_tokens
    if tokens.embedding != base.embedding:
        raise _not_served(adapter, f"trainable tokens on '{tokens.embedding}'")
    unknown = [name for name in tokens.tied_outputs if name != base.tied_output]
    if unknown:
        raise _not_served(adapter, f"trainable tokens tied to '{unknown[0]}'")
    _capacity(
        adapter,
        "trainable tokens",
        len(tokens.token_ids),
        capacity.max_trainable_tokens,
        "max_trainable_tokens",
    )
    rows = adapter.weights[f"{PREFIX}{tokens.embedding}.token_adapter.trainable_tokens_delta"]
    return TokenRows(ids=tokens.token_ids, rows=rows, tied=bool(tokens.tied_outputs))


def _check_base_copies(adapter: AdapterFiles, plan: ModulePlan, weights: BaseWeights) -> None:
    """PEFT saves the embedding matrices beside an embedding LoRA; they must be the base's own."""
    for key in plan.base_copies:
        if key not in adapter.weights:
            continue
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".")
        base = weights.parameter(name)
        if not torch.equal(adapter.weights[key].to(base.dtype), base.detach().cpu()):
            raise _not_served(
                adapter, f"its own copy of '{name}' (a resized or trained embedding, unlike this base's)"
            )


def _ia3(adapter: AdapterFiles, plan: ModulePlan, base: BaseShape) -> NativeAdapter:
    _check_targets(adapter, list(plan.ia3), base)
    ia3 = {
        module: (adapter.weights[f"{PREFIX}{module}.ia3_l"].flatten(), on_input)
        for module, on_input in plan.ia3.items()
    }
    return NativeAdapter(method="ia3", ia3=ia3)


def _prompt(adapter: AdapterFiles, base: BaseShape, max_virtual_tokens: int) -> NativeAdapter:
    embeddings = adapter.weights["prompt_embeddings"]
    count = embeddings.shape[0]
    _capacity(adapter, "virtual tokens", count, max_virtual_tokens, "max_virtual_tokens")
    if adapter.method != "prefix_tuning":
        return NativeAdapter(method=adapter.method, virtual_tokens=embeddings)
    # PEFT's get_prompt views (n, layers*2, heads, head_dim): entry 2l holds layer l's keys, 2l+1 its values.
    blocks = embeddings.view(count, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return NativeAdapter(method=adapter.method, prefix_kv=blocks.permute(1, 2, 3, 0, 4))
