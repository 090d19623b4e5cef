"""Decoder families the fast runtime serves: one module each, registered by ``model_type``.

A family is a small description (``Family``) that the one forward in ``runtime/model.py`` reads: how
q/k/v and the MLP's gate/up come out of the projections (separate or fused), where the norms sit,
the attention scale, softcaps, q/k norms, which layers attend through a sliding window, and whether
rotary embeddings differ per layer type. Norm type and offset, the embedding scale and the
activation are the Hugging Face modules' own: the runtime calls them, so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PretrainedConfig

from adapterhub.errors import UserError


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def standard_query_scale(config: PretrainedConfig) -> float:
    return head_dim(config) ** -0.5


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (keys within the last ``w`` positions), None for full attention.

    transformers' own rule: ``layer_types`` when the config has them, else ``sliding_window`` for
    every layer when set.
    """
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * layers


@dataclass(frozen=True)
class Family:
    """What differs between decoder families, as data."""

    name: str
    model_types: tuple[str, ...]
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # one name: a fused projection, split by width
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # one name: a fused projection, chunked in two
    activation: str = "act_fn"  # the MLP module's activation attribute
    sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma 2 and 3)
    qk_norm: bool = False  # per-head RMS norms on queries and keys (Qwen3, Gemma 3)
    query_scale: Callable[[PretrainedConfig], float] = standard_query_scale
    attention_softcap: str | None = None  # config attribute: tanh-capped attention logits
    final_softcap: str | None = None  # config attribute: tanh-capped output logits
    rotary_per_layer_type: bool = False  # one rotary embedding per layer type (Gemma 3)
    windows: Callable[[PretrainedConfig], list[int | None]] = layer_windows

    @property
    def lora_groups(self) -> tuple[tuple[str, ...], ...]:
        """Projections that read the same input share one LoRA A table."""
        return (self.qkv, ("o_proj",), self.gate_up, ("down_proj",))

    def softcap(self, config: PretrainedConfig, which: str | None) -> float | None:
        return None if which is None else getattr(config, which, None)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        _REGISTRY[model_type] = family
    return family


def supported() -> list[str]:
    return sorted(_REGISTRY)


def serves(config: PretrainedConfig) -> bool:
    return config.model_type in _REGISTRY and not getattr(config, "is_encoder_decoder", False)


def family_for(config: PretrainedConfig, base_name: str) -> Family:
    family = _REGISTRY.get(config.model_type)
    if family is None or getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"base '{base_name}' is a {config.model_type} model, which the fast runtime does not serve "
            f"(it serves {', '.join(supported())})"
        )
    return family


# Importing a family module registers it.
from adapterhub.runtime.families import gemma, llama, phi3  # noqa: E402, F401
