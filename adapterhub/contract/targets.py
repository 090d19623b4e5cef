"""Which base modules an adapter changes, and how: decided by PEFT itself, on a meta-device copy of the base.

The one module matcher. PEFT resolves ``target_modules`` (list suffixes, regex strings, "all-linear",
the per-architecture defaults), ``exclude_modules``, ``layers_to_transform``/``layers_pattern``,
``rank_pattern``/``alpha_pattern``, IA3's ``feedforward_modules``, DoRA, LoRA biases and trainable
tokens when it builds its layers; this module builds them on a weightless copy of the base and reads
the result off, together with the exact state-dict keys and shapes that PEFT would load. Nothing of
PEFT's matching is re-implemented, so it cannot drift from PEFT.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from adapterhub.runtime.api import RequestError

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraTarget:
    """One module with a LoRA: a linear projection (``B A x``) or an embedding (``B A[ids]``), or
    another of PEFT's layer kinds (which only the PEFT fallback serves)."""

    module: str  # the base module's name, e.g. model.layers.0.self_attn.q_proj or lm_head
    kind: str  # "linear", "embedding", or PEFT's layer class name (Conv1d, ...)
    fan_in_fan_out: bool  # the base stores the weight transposed (GPT-2's Conv1D)
    rank: int
    scaling: float
    use_dora: bool
    lora_bias: bool


@dataclass(frozen=True)
class TrainableTokens:
    """Embedding rows an adapter replaces (PEFT's TrainableTokens), and the output layers tied to them."""

    embedding: str
    token_ids: tuple[int, ...]
    tied_outputs: tuple[str, ...]


@dataclass
class ModulePlan:
    """What PEFT would build for one LoRA or IA3 config on one base, and the weights it would load."""

    lora: dict[str, LoraTarget] = field(default_factory=dict)
    ia3: dict[str, bool] = field(default_factory=dict)  # module -> scales its input (feed-forward)
    biases: tuple[str, ...] = ()  # modules whose bias the saved one replaces (bias all / lora_only)
    trainable_tokens: TrainableTokens | None = None
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)  # saved key -> shape
    # Base weights PEFT may save beside an adapted embedding (save_embedding_layers); optional.
    base_copies: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # ensure_weight_tying on a tied base with an adapted embedding or head: PEFT ties the adapters too.
    ties_adapters: bool = False


class BaseModules:
    """A base model's module tree on the meta device; plans are cached per adapter config."""

    def __init__(self, config: PretrainedConfig) -> None:
        from adapterhub.models import auto_class

        self.config = config
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = auto_class(config).from_config(config)
        self.names = {name for name, _ in self.model.named_modules() if name}
        self._plans: dict[str, ModulePlan] = {}
        self._lock = threading.Lock()

    def plan(self, method: str, config: dict, where: str) -> ModulePlan:
        key = json.dumps([method, config], sort_keys=True, default=str)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = self._build(method, config, where)
            return self._plans[key]

    def _build(self, method: str, config: dict, where: str) -> ModulePlan:
        from peft import get_peft_model, get_peft_model_state_dict

        from adapterhub.contract.config_keys import peft_config_class

        cls = peft_config_class(method)
        fields = cls.__dataclass_fields__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_config = cls(**{k: v for k, v in config.items() if k in fields})
                peft_model = get_peft_model(copy.deepcopy(self.model), peft_config)
                expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
                with_copies = get_peft_model_state_dict(peft_model, save_embedding_layers=True)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
            reason = " ".join(str(err).split())[:200]
            raise RequestError(
                f"adapter {where} does not fit this base: PEFT cannot build it here ({reason})",
                "incompatible_adapter",
            ) from err
        plan = ModulePlan(
            expected={key: tuple(t.shape) for key, t in expected.items()},
            base_copies={key: tuple(t.shape) for key, t in with_copies.items() if key not in expected},
        )
        _read_layers(peft_model.base_model.model, plan, where)
        plan.biases = tuple(
            sorted(
                key.removeprefix(PREFIX).removesuffix(".bias").removesuffix(".base_layer")
                for key in plan.expected
                if key.endswith(".bias") and not key.endswith("lora_B.bias")
            )
        )
        tied = plan.trainable_tokens is not None or any(
            target.kind == "embedding" or target.module in _output_names(self.model)
            for target in plan.lora.values()
        )
        plan.ties_adapters = bool(
            config.get("ensure_weight_tying") and tied and getattr(self.config, "tie_word_embeddings", False)
        )
        return plan


def _output_names(model: torch.nn.Module) -> set[str]:
    output = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is output}


def _read_layers(model: torch.nn.Module, plan: ModulePlan, where: str) -> None:
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import Embedding, LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    tied_outputs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            kind = {LoraLinear: "linear", Embedding: "embedding"}.get(type(module), type(module).__name__)
            plan.lora[name] = LoraTarget(
                module=name,
                kind=kind,
                fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)),
                rank=module.r["default"],
                scaling=float(module.scaling["default"]),
                use_dora=bool(module.use_dora["default"]),
                lora_bias=bool(module.lora_bias["default"]),
            )
        elif isinstance(module, IA3Layer):
            plan.ia3[name] = bool(module.is_feedforward)
        elif isinstance(module, TrainableTokensLayer):
            # Beneath a LoRA on the same module the wrapper sits at '<module>.base_layer'.
            owner = name.removesuffix(".token_adapter").removesuffix(".base_layer")
            if module.tied_adapter is not None:
                tied_outputs.append(owner)
            else:
                plan.trainable_tokens = TrainableTokens(
                    embedding=owner,
                    token_ids=tuple(int(i) for i in module.token_indices["default"]),
                    tied_outputs=(),
                )
    if plan.trainable_tokens is not None and tied_outputs:
        tokens = plan.trainable_tokens
        plan.trainable_tokens = TrainableTokens(tokens.embedding, tokens.token_ids, tuple(tied_outputs))
