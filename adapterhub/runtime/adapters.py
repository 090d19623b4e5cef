"""Converting a checked PEFT adapter into the engine's native form, on the CPU tier, in the engine's dtype.

What an adapter means is decided by ``adapterhub.contract`` (PEFT's own module plan); this module
only reshapes the saved tensors:

- LoRA: per module ``A`` (rank × in) and ``B`` multiplied by PEFT's scaling (rank × out), so a row's
  delta is ``(x Aᵀ) B``.
- IA3: per module one scale vector, applied to the input (feed-forward modules) or the output.
- prompt tuning and P-tuning: the virtual-token embeddings (PEFT saves P-tuning's prompt-encoder
  output, so its encoder has already been run once by ``save_pretrained``).
- prefix tuning: per-layer key/value blocks (PEFT saves the projected prefix, i.e. the encoder output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
    """What an adapter must agree with: layer count, widths and the in/out features of each projection."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    targets: frozenset[str]  # names of the modules whose LoRA/IA3 the decoder applies per row


@dataclass
class NativeAdapter:
    """One adapter in engine-native form; module keys are the base's module names."""

    method: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ia3: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict)  # (vector, on input)
    virtual_tokens: torch.Tensor | None = None  # (n, hidden)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, kv heads, n, head dim)
    flat: torch.Tensor | None = None  # the one buffer all tensors view, once packed
    pending_scale: dict[str, float] = field(default_factory=dict)  # LoRA B × this, when packed

    @property
    def rank(self) -> int | None:
        return max(a.shape[0] for a, _ in self.lora.values()) if self.method == "lora" else None

    @property
    def num_virtual_tokens(self) -> int | None:
        if self.virtual_tokens is not None:
            return self.virtual_tokens.shape[0]
        return self.prefix_kv.shape[3] if self.prefix_kv is not None else None

    def tensors(self) -> list[torch.Tensor]:
        found = [t for pair in self.lora.values() for t in pair] + [v for v, _ in self.ia3.values()]
        return found + [t for t in (self.virtual_tokens, self.prefix_kv) if t is not None]

    def with_tensors(self, tensors: list[torch.Tensor], flat: torch.Tensor | None = None) -> NativeAdapter:
        """The same adapter with ``tensors`` (in ``tensors()`` order) in place of its own."""
        replacements = iter(tensors)
        return NativeAdapter(
            method=self.method,
            lora={key: (next(replacements), next(replacements)) for key in self.lora},
            ia3={key: (next(replacements), on_input) for key, (_, on_input) in self.ia3.items()},
            virtual_tokens=None if self.virtual_tokens is None else next(replacements),
            prefix_kv=None if self.prefix_kv is None else next(replacements),
            flat=flat,
        )

    def packed(self, dtype: torch.dtype, pin: bool) -> NativeAdapter:
        """All tensors as views of one flat CPU buffer, page-locked when ``pin`` (the CUDA CPU tier),
        so moving the adapter to the device is a single DMA."""
        tensors = self.tensors()
        flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, pin_memory=pin)
        views = _views(flat, tensors)
        scales = [1.0] * len(tensors)
        for index, key in enumerate(self.lora):
            scales[2 * index + 1] = self.pending_scale.get(key, 1.0)
        # One pass: cast, transpose and LoRA scaling all happen in the copy into the buffer.
        for view, tensor, scale in zip(views, tensors, scales, strict=True):
            if scale == 1.0:
                view.copy_(tensor)
            else:
                torch.mul(tensor, scale, out=view)
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


def load_native(
    folder: Path,
    base: BaseShape,
    modules: BaseModules,
    *,
    max_rank: int,
    max_virtual_tokens: int,
    dtype: torch.dtype,
    pin: bool,
) -> NativeAdapter:
    """Read and check a PEFT adapter folder against the base, then convert it into one packed
    CPU-tier buffer (page-locked when ``pin``)."""
    adapter = read_adapter(folder)
    plan = plan_for_base(adapter, modules)
    if adapter.method == "lora":
        native = _lora(adapter, plan, base, max_rank)
    elif adapter.method == "ia3":
        native = _ia3(adapter, plan, base)
    else:
        native = _prompt(adapter, base, max_virtual_tokens)
    return native.packed(dtype, pin=pin)


def _not_served(adapter: AdapterFiles, what: str) -> RequestError:
    return RequestError(
        f"adapter {adapter.label}: {what} is not served by the multi-adapter runtime yet: "
        "merge the adapter with `adapterhub merge`, or serve it with plain PEFT",
        "unsupported_adapter",
    )


def _check_targets(adapter: AdapterFiles, modules: list[str], base: BaseShape) -> None:
    for module in modules:
        if module not in base.targets:
            raise _not_served(adapter, f"an adapter on '{module}'")


def _lora(adapter: AdapterFiles, plan: ModulePlan, base: BaseShape, max_rank: int) -> NativeAdapter:
    if plan.biases:
        raise _not_served(
            adapter, f"replacing the bias of '{plan.biases[0]}' (bias={adapter.config.get('bias')})"
        )
    if plan.trainable_tokens is not None:
        raise _not_served(adapter, "trainable_token_indices")
    _check_targets(adapter, list(plan.lora), base)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[str, float] = {}
    for module, target in plan.lora.items():
        if target.use_dora:
            raise _not_served(adapter, f"DoRA (on '{module}')")
        if target.lora_bias:
            raise _not_served(adapter, f"lora_bias (on '{module}')")
        if target.rank > max_rank:
            raise RequestError(
                f"adapter {adapter.label} has LoRA rank {target.rank} but slots hold rank {max_rank}: "
                f"start the engine with max_lora_rank >= {target.rank}",
                "slot_capacity",
            )
        key = PREFIX + module
        lora[module] = (adapter.weights[f"{key}.lora_A.weight"], adapter.weights[f"{key}.lora_B.weight"].t())
        scales[module] = target.scaling
    return NativeAdapter(method="lora", lora=lora, pending_scale=scales)


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
    if count > max_virtual_tokens:
        raise RequestError(
            f"adapter {adapter.label} has {count} virtual tokens but slots hold {max_virtual_tokens}: "
            f"start the engine with max_virtual_tokens >= {count}",
            "slot_capacity",
        )
    if adapter.method != "prefix_tuning":
        return NativeAdapter(method=adapter.method, virtual_tokens=embeddings)
    # PEFT's get_prompt views (n, layers*2, heads, head_dim): entry 2l holds layer l's keys, 2l+1 its values.
    blocks = embeddings.view(count, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return NativeAdapter(method=adapter.method, prefix_kv=blocks.permute(1, 2, 3, 0, 4))
