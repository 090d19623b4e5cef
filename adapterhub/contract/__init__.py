"""The adapter contract: what adapterhub accepts of a PEFT adapter folder, checked in one place.

Every path by which an adapter enters — ``pull``, ``serve`` and ``POST /v1/adapters``, ``chat``,
``merge``, training ``resume`` — calls ``read_adapter`` (the files on their own: every config key is
honoured or refused, the weights are readable, finite and consistent) and, where the base is known,
``plan_for_base`` (PEFT's own module plan on that base, and the saved weights compared key by key and
shape by shape with what PEFT would load). A folder that passes is served exactly as PEFT would
serve it; anything else is refused with one line naming the key, the value or the shapes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

from adapterhub.contract.config_keys import WRITTEN_AGAINST_PEFT, check_keys
from adapterhub.contract.files import CONFIG_FILE, read_config, read_weights
from adapterhub.contract.targets import PREFIX, BaseModules, LoraTarget, ModulePlan, TrainableTokens
from adapterhub.runtime.api import RequestError

PEFT_TYPES = {
    "LORA": "lora",
    "IA3": "ia3",
    "PROMPT_TUNING": "prompt_tuning",
    "P_TUNING": "p_tuning",
    "PREFIX_TUNING": "prefix_tuning",
}
SUPPORTED_NAMES = "LoRA, IA3, prompt tuning, P-tuning, prefix tuning"
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")

__all__ = [
    "CONFIG_FILE",
    "PEFT_TYPES",
    "PREFIX",
    "PROMPT_METHODS",
    "SUPPORTED_NAMES",
    "WRITTEN_AGAINST_PEFT",
    "AdapterFiles",
    "BaseModules",
    "LoraTarget",
    "ModulePlan",
    "PromptShape",
    "TrainableTokens",
    "check_folder",
    "plan_for_base",
    "read_adapter",
]


@dataclass
class AdapterFiles:
    """An adapter folder's config and weights, checked on their own (no base needed)."""

    folder: Path
    method: str  # one of the five families
    config: dict
    weights: dict[str, torch.Tensor]
    label: str  # how messages name it: the folder, or a repo id while a pull is being checked

    @property
    def stored_params(self) -> int:
        return sum(t.numel() for t in self.weights.values())


@dataclass(frozen=True)
class PromptShape:
    """How a prompt-family adapter's saved embeddings are laid out on this base."""

    num_virtual_tokens: int
    width: int  # hidden size (prompt/P-tuning) or layers × 2 × kv heads × head dim (prefix)


def read_adapter(folder: str | Path, label: str | None = None) -> AdapterFiles:
    """Read and check an adapter folder on its own: config keys, weights, and their agreement."""
    folder = Path(folder)
    label = label or str(folder)
    config = read_config(folder, label)
    peft_type = str(config["peft_type"])
    method = PEFT_TYPES.get(peft_type)
    if method is None:
        raise RequestError(
            f"adapter {label} is {peft_type}, which adapterhub cannot serve: use one of {SUPPORTED_NAMES}",
            "unsupported_adapter",
        )
    check_keys(method, config, label)
    _check_values(method, config, label)
    weights = read_weights(folder, label)
    _check_structure(label, method, config, weights)
    # One fp32-accumulated pass per tensor: any NaN or inf makes its sum non-finite.
    for key, tensor in weights.items():
        if not math.isfinite(float(torch.sum(tensor, dtype=torch.float32))):
            raise RequestError(
                f"adapter {label} holds NaN or inf weights ('{key}'): retrain or re-download it",
                "corrupt_adapter",
            )
    return AdapterFiles(folder=folder, method=method, config=config, weights=weights, label=label)


def _check_values(method: str, config: dict, label: str) -> None:
    """PEFT's own config class accepts the values (types, ranges, combinations)."""
    from adapterhub.contract.config_keys import peft_config_class

    cls = peft_config_class(method)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**{key: value for key, value in config.items() if key in cls.__dataclass_fields__})
    except (ValueError, TypeError, KeyError) as err:
        reason = " ".join(str(err).split())[:200]
        raise RequestError(
            f"adapter {label}: {CONFIG_FILE} is not a valid {method} config ({reason}): re-save it",
            "corrupt_adapter",
        ) from err


def check_folder(folder: str | Path, base_config: PretrainedConfig | None = None) -> AdapterFiles:
    """``read_adapter``, then ``plan_for_base`` when the base's config is known."""
    adapter = read_adapter(folder)
    if base_config is not None:
        plan_for_base(adapter, BaseModules(base_config))
    return adapter


def plan_for_base(adapter: AdapterFiles, base: BaseModules) -> ModulePlan | PromptShape:
    """PEFT's plan for this adapter on this base, after checking the saved weights against it."""
    _check_task(adapter, base.config)
    if adapter.method in PROMPT_METHODS:
        return _prompt_shape(adapter, base.config)
    plan = base.plan(adapter.method, adapter.config, adapter.label)
    _compare_with_plan(adapter, plan, base)
    return plan


def _check_task(adapter: AdapterFiles, config: PretrainedConfig) -> None:
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    task = adapter.config.get("task_type")
    if task not in (None, "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM"):
        kind = "an encoder-decoder" if seq2seq else "a decoder"
        raise RequestError(
            f"adapter {adapter.label} is for {task}, and this base is {kind}: use an adapter trained on it",
            "incompatible_adapter",
        )


def _compare_with_plan(adapter: AdapterFiles, plan: ModulePlan, base: BaseModules) -> None:
    where = f"adapter {adapter.label}"
    for key, tensor in adapter.weights.items():
        want = plan.expected.get(key, plan.base_copies.get(key))
        if want is None:
            module = _module_of(key)
            if module not in base.names:
                raise RequestError(
                    f"{where} was trained for a different base: this base has no module '{module}' "
                    f"(for '{key}'): use an adapter trained on this base",
                    "incompatible_adapter",
                )
            raise RequestError(
                f"{where} holds '{key}', which its own config does not build (PEFT would ignore it): "
                "re-save the adapter with PEFT",
                "corrupt_adapter",
            )
        if tuple(tensor.shape) != want:
            raise RequestError(
                f"{where} was trained for a different base: '{key}' is {list(tensor.shape)} there, "
                f"{list(want)} on this base",
                "incompatible_adapter",
            )
    missing = [key for key in plan.expected if key not in adapter.weights]
    if missing:
        raise RequestError(
            f"{where} misses '{missing[0]}' (and {len(missing) - 1} more), which its config builds: "
            "re-save the adapter with PEFT",
            "corrupt_adapter",
        )


def _module_of(key: str) -> str:
    """The base module a saved key belongs to: ``base_model.model.X.lora_A.weight`` -> ``X``."""
    name = key.removeprefix(PREFIX)
    for marker in (".lora_", ".ia3_", ".base_layer.", ".token_adapter."):
        if marker in name:
            return name.split(marker)[0]
    return name.rsplit(".", 1)[0]


def _check_structure(label: str, method: str, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """What the files must agree on whatever the base: pairs of LoRA tensors, prompt embedding shapes."""
    problem = None
    if method == "lora":
        problem = _lora_problem(weights)
    elif method == "ia3" and not any(key.endswith(".ia3_l") for key in weights):
        problem = "no ia3_l vectors"
    elif method in PROMPT_METHODS:
        problem = _prompt_problem(method, config, weights)
    if problem:
        raise RequestError(
            f"adapter {label}: the weights do not match its {method} config: {problem}; re-save it",
            "corrupt_adapter",
        )


def _lora_problem(weights: dict[str, torch.Tensor]) -> str | None:
    pairs = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
    found = False
    for key, a in weights.items():
        for a_name, b_name in pairs:
            if key.endswith(a_name):
                found = True
                b = weights.get(key.removesuffix(a_name) + b_name)
                if b is None:
                    return f"'{key}' has no matching {b_name}"
                rank = a.shape[0]
                if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
                    return f"'{key}' and its {b_name} disagree on the rank"
    return None if found else "no lora_A/lora_B weights"


def _prompt_problem(method: str, config: dict, weights: dict[str, torch.Tensor]) -> str | None:
    embeddings = weights.get("prompt_embeddings")
    if embeddings is None or embeddings.dim() != 2 or len(weights) != 1:
        return "expected exactly one 2-D prompt_embeddings tensor"
    count = config.get("num_virtual_tokens")
    # Prompt and P-tuning keep a row per virtual token per side (encoder, decoder); prefix tuning one.
    sides = 1 if method == "prefix_tuning" else config.get("num_transformer_submodules") or 1
    if not isinstance(count, int) or embeddings.shape[0] != count * sides:
        return f"prompt_embeddings has {embeddings.shape[0]} rows, num_virtual_tokens is {count}"
    return None


def _prompt_shape(adapter: AdapterFiles, config: PretrainedConfig) -> PromptShape:
    """The saved embeddings' shape as PEFT lays them out on this base (its own
    ``_prepare_prompt_learning_config``), checked against what was saved."""
    from peft.utils.other import _prepare_prompt_learning_config

    from adapterhub.contract.config_keys import peft_config_class

    cls = peft_config_class(adapter.method)
    # The sizes PEFT fills in from the base; the saved config holds those of the base it was made on.
    derived = ("num_layers", "token_dim", "num_attention_heads", "num_transformer_submodules")
    given = {
        key: value
        for key, value in adapter.config.items()
        if key in cls.__dataclass_fields__ and key not in derived
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = _prepare_prompt_learning_config(cls(**given), config)
    # PeftModel's rule: an encoder-decoder gets virtual tokens on both sides (prefix tuning's
    # encoder makes one row per virtual token whatever the side count).
    sides = 2 if getattr(config, "is_encoder_decoder", False) else 1
    count = adapter.config["num_virtual_tokens"]
    prefix = adapter.method == "prefix_tuning"
    want = (
        count if prefix else count * sides,
        prepared.token_dim * (2 * prepared.num_layers if prefix else 1),
    )
    embeddings = adapter.weights["prompt_embeddings"]
    if tuple(embeddings.shape) != want:
        raise RequestError(
            f"adapter {adapter.label} was trained for a different base: prompt_embeddings is "
            f"{list(embeddings.shape)} there, {list(want)} on this base",
            "incompatible_adapter",
        )
    return PromptShape(num_virtual_tokens=count, width=want[1])
