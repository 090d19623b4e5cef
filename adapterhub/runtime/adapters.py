"""Reading adapter folders written by PEFT's ``save_pretrained`` into the engine's native form.

Native form is computed once at load, on the CPU tier, in the engine's dtype:

- LoRA: per projection ``A`` (rank × in) and ``B`` already multiplied by its scaling (rank × out),
  so a row's delta is ``(x Aᵀ) B``; rsLoRA, ``rank_pattern`` and ``alpha_pattern`` are resolved here.
- IA3: per projection one scale vector, applied to the input (feed-forward modules) or the output.
- prompt tuning and P-tuning: the virtual-token embeddings (PEFT saves P-tuning's prompt-encoder
  output, so its encoder has already been run once by ``save_pretrained``).
- prefix tuning: per-layer key/value blocks (PEFT saves the projected prefix, i.e. the encoder output).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapterhub.runtime.api import RequestError

PEFT_TYPES = {
    "LORA": "lora",
    "IA3": "ia3",
    "PROMPT_TUNING": "prompt_tuning",
    "P_TUNING": "p_tuning",
    "PREFIX_TUNING": "prefix_tuning",
}
SUPPORTED_NAMES = "LoRA, IA3, prompt tuning, P-tuning, prefix tuning"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MODULE_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(.+)$")


@dataclass(frozen=True)
class BaseShape:
    """What an adapter must agree with: layer count, widths and the in/out features of each projection."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    features: dict[str, tuple[int, int]]  # projection name -> (in_features, out_features)


@dataclass
class NativeAdapter:
    """One adapter in engine-native form; module keys are ``(layer index, projection name)``."""

    method: str
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ia3: dict[tuple[int, str], tuple[torch.Tensor, bool]] = field(default_factory=dict)  # (vector, on input)
    virtual_tokens: torch.Tensor | None = None  # (n, hidden)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, kv heads, n, head dim)
    flat: torch.Tensor | None = None  # the one buffer all tensors view, once packed
    pending_scale: dict[tuple[int, str], float] = field(default_factory=dict)  # LoRA B × this, when packed

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


def read_config(folder: Path) -> dict:
    config_file = folder / "adapter_config.json"
    if not config_file.exists():
        raise RequestError(
            f"adapter folder {folder} has no adapter_config.json: give a PEFT save_pretrained folder",
            "corrupt_adapter",
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise RequestError(
            f"adapter {config_file} is not valid JSON ({reason}): re-save the adapter", "corrupt_adapter"
        ) from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise RequestError(f"adapter {config_file} has no peft_type: re-save the adapter", "corrupt_adapter")
    return config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if safetensors_file.exists():
            return load_file(safetensors_file)
        if bin_file.exists():
            return torch.load(bin_file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        # torch.load(weights_only=True) refuses a pickle that would run code: UnpicklingError.
        raise RequestError(
            f"adapter weights in {folder} are unreadable ({str(err).splitlines()[0][:80]}): "
            "re-download or re-save it",
            "corrupt_adapter",
        ) from err
    raise RequestError(
        f"adapter folder {folder} has no adapter_model.safetensors: give a folder saved by PEFT",
        "corrupt_adapter",
    )


def load_native(
    folder: Path, base: BaseShape, *, max_rank: int, max_virtual_tokens: int, dtype: torch.dtype, pin: bool
) -> NativeAdapter:
    """Read a PEFT adapter folder, check it against the base and the slot capacity, and convert it
    into one packed CPU-tier buffer (page-locked when ``pin``)."""
    folder = Path(folder)
    config = read_config(folder)
    peft_type = str(config["peft_type"])
    method = PEFT_TYPES.get(peft_type)
    if method is None:
        raise RequestError(
            f"adapter {folder} is {peft_type}, which the runtime cannot serve: use one of {SUPPORTED_NAMES}",
            "unsupported_adapter",
        )
    if config.get("modules_to_save"):
        raise RequestError(
            f"adapter {folder} also trains modules_to_save {config['modules_to_save']}: retrain without them",
            "unsupported_adapter",
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise RequestError(
            f"adapter {folder} is for task {config['task_type']}: the runtime serves CAUSAL_LM adapters",
            "incompatible_adapter",
        )
    weights = read_weights(folder)
    if method == "lora":
        adapter = _lora(folder, config, weights, base, max_rank)
    elif method == "ia3":
        adapter = _ia3(folder, config, weights, base)
    else:
        adapter = _prompt(folder, method, config, weights, base, max_virtual_tokens)
    packed = adapter.packed(dtype, pin=pin)
    # One fp32-accumulated pass: any NaN or inf makes the sum non-finite.
    if not torch.isfinite(torch.sum(packed.flat, dtype=torch.float32)):
        raise RequestError(f"adapter {folder} holds NaN or inf weights: retrain it", "corrupt_adapter")
    return packed


def _module_tensors(
    folder: Path, weights: dict[str, torch.Tensor], base: BaseShape
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """Group tensors by projection, refusing any key that names a module this base does not have."""
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _MODULE_KEY.match(key)
        if match is None or match[3] not in base.features or int(match[1]) >= base.num_layers:
            raise RequestError(
                f"adapter {folder} targets '{key}', which this base has no such projection for: "
                f"use an adapter trained on this base (targets among {', '.join(PROJECTIONS)})",
                "incompatible_adapter",
            )
        grouped.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor
    return grouped


def _incompatible(folder: Path, what: str) -> RequestError:
    return RequestError(
        f"adapter {folder} was trained for a different base ({what}): use an adapter trained on this base",
        "incompatible_adapter",
    )


def _pattern_value(patterns: dict, module_name: str, default: float) -> float:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _lora(folder: Path, config: dict, weights: dict, base: BaseShape, max_rank: int) -> NativeAdapter:
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise RequestError(
                f"adapter {folder} uses {flag}, which the runtime does not serve: "
                f"retrain as plain LoRA (or use one of {SUPPORTED_NAMES})",
                "unsupported_adapter",
            )
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple[int, str], float] = {}
    for (layer, proj), parts in _module_tensors(folder, weights, base).items():
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a is None or b is None or set(parts) - {"lora_A.weight", "lora_B.weight"}:
            raise RequestError(
                f"adapter {folder} has incomplete LoRA weights for layer {layer} {proj}: re-save the adapter",
                "corrupt_adapter",
            )
        in_features, out_features = base.features[proj]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise _incompatible(
                folder, f"{proj} is {a.shape[1]}→{b.shape[0]} there, {in_features}→{out_features} here"
            )
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise RequestError(
                f"adapter {folder} LoRA A and B ranks differ at {proj}: re-save it", "corrupt_adapter"
            )
        if rank > max_rank:
            raise RequestError(
                f"adapter {folder} has LoRA rank {rank} but slots hold rank {max_rank}: "
                f"start the engine with max_lora_rank >= {rank}",
                "slot_capacity",
            )
        block = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        module_name = f"model.layers.{layer}.{block}.{proj}"
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module_name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lora[(layer, proj)] = (a, b.t())
        scales[(layer, proj)] = scaling
    if not lora:
        raise RequestError(f"adapter {folder} has no LoRA weights: re-save the adapter", "corrupt_adapter")
    return NativeAdapter(method="lora", lora=lora, pending_scale=scales)


def _ia3(folder: Path, config: dict, weights: dict, base: BaseShape) -> NativeAdapter:
    feedforward = config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        feedforward = [feedforward]
    ia3: dict[tuple[int, str], tuple[torch.Tensor, bool]] = {}
    for (layer, proj), parts in _module_tensors(folder, weights, base).items():
        vector = parts.get("ia3_l")
        if vector is None or len(parts) != 1:
            raise RequestError(
                f"adapter {folder} has unexpected IA3 tensors at {proj}: re-save it", "corrupt_adapter"
            )
        on_input = any(proj == name or proj.endswith(name) for name in feedforward)
        in_features, out_features = base.features[proj]
        if vector.numel() != (in_features if on_input else out_features):
            raise _incompatible(folder, f"IA3 vector of {proj} has {vector.numel()} entries")
        ia3[(layer, proj)] = (vector.flatten(), on_input)
    if not ia3:
        raise RequestError(f"adapter {folder} has no IA3 weights: re-save the adapter", "corrupt_adapter")
    return NativeAdapter(method="ia3", ia3=ia3)


def _prompt(
    folder: Path, method: str, config: dict, weights: dict, base: BaseShape, max_virtual_tokens: int
) -> NativeAdapter:
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None or embeddings.dim() != 2:
        raise RequestError(f"adapter {folder} has no prompt_embeddings tensor: re-save it", "corrupt_adapter")
    if config.get("num_transformer_submodules", 1) != 1:
        raise _incompatible(folder, "it is for an encoder-decoder model")
    count = embeddings.shape[0]
    if count > max_virtual_tokens:
        raise RequestError(
            f"adapter {folder} has {count} virtual tokens but slots hold {max_virtual_tokens}: "
            f"start the engine with max_virtual_tokens >= {count}",
            "slot_capacity",
        )
    if method != "prefix_tuning":
        if embeddings.shape[1] != base.hidden_size:
            raise _incompatible(
                folder, f"token width {embeddings.shape[1]}, this base has {base.hidden_size}"
            )
        return NativeAdapter(method=method, virtual_tokens=embeddings)
    kv_width = base.num_kv_heads * base.head_dim
    if embeddings.shape[1] != base.num_layers * 2 * kv_width:
        raise _incompatible(
            folder,
            f"prefix width {embeddings.shape[1]}, this base needs {base.num_layers} layers × 2 × {kv_width}",
        )
    # PEFT's get_prompt views (n, layers*2, heads, head_dim): entry 2l holds layer l's keys, 2l+1 its values.
    blocks = embeddings.view(count, base.num_layers, 2, base.num_kv_heads, base.head_dim)
    return NativeAdapter(method=method, prefix_kv=blocks.permute(1, 2, 3, 0, 4))
