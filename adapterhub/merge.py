"""Fold LoRA or IA3 adapters, one or a weighted combination, into a standalone Hugging Face model.

The base is loaded in fp32 and merged there, then cast to the output dtype once, so rounding
happens a single time. Never merged into 4-bit weights: for an adapter trained on an NF4 base the
``nf4`` base-weights policy loads the base through the same NF4 path training used, dequantizes
those weights to fp32 and merges into them, so the exported model computes what the adapter was
trained and served on (see docs/merge.md for the measured difference to the ``original`` policy).

torch, transformers and peft are imported inside functions so that ``adapterhub --help``, which
imports every command module, stays fast.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from adapterhub import yamlio
from adapterhub.errors import UserError
from adapterhub.paths import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from adapterhub.contract import AdapterFiles

MERGEABLE_METHODS = {"LORA": "lora", "IA3": "ia3"}
PROMPT_FAMILY = {
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "P-tuning",
    "PREFIX_TUNING": "prefix tuning",
}
COMBINE_METHODS = {
    "lora": ("linear", "cat", "ties", "dare_linear", "dare_ties"),
    "ia3": ("linear",),
}
ALL_COMBINE_METHODS = COMBINE_METHODS["lora"]
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
BASE_WEIGHT_POLICIES = ("auto", "original", "nf4")
OUTPUT_DTYPES = ("auto", "fp32", "bf16", "fp16")
STEPS = ("loading base model", "loading adapters", "combining adapters", "merging", "saving")
COMBINED_ADAPTER = "combined"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class AdapterSource:
    """One adapter as found on disk, before anything is loaded."""

    spec: str
    path: Path
    method: str  # "lora" or "ia3"
    base_model: str | None
    rank: int | None
    trained_quantization: str | None  # from the training recipe; None when it is not recorded
    files: AdapterFiles = field(repr=False, compare=False)


@dataclass
class MergeRequest:
    """Everything ``adapterhub merge`` takes; ``weights=None`` means equal weights summing to 1."""

    adapters: list[str]
    out: Path
    base: str | None = None
    dtype: str = "auto"
    combine: str | None = None
    weights: list[float] | None = None
    density: float | None = None
    seed: int = 0
    base_weights: str = "auto"
    overwrite: bool = False


@dataclass
class MergePlan:
    """A fully checked request: every bad input is refused while building it, before any loading."""

    adapters: list[AdapterSource]
    out: Path
    base: str
    method: str
    dtype: str  # float32, bfloat16 or float16
    base_weights: str  # original or nf4
    combine: str | None  # None: a single adapter merged as it is
    weights: list[float] | None
    density: float | None
    seed: int
    overwrite: bool = False

    @property
    def weighted_adapters(self) -> list[tuple[AdapterSource, float]]:
        """Each adapter with its combination weight (1 for a single adapter merged as it is)."""
        return list(zip(self.adapters, self.weights or [1.0] * len(self.adapters), strict=True))

    @property
    def dare_seed(self) -> int | None:
        return self.seed if self.combine in ("dare_linear", "dare_ties") else None

    @property
    def settings(self) -> dict:
        """What the model card and ``--json`` record."""
        return {
            "base_model": self.base,
            "base_weights": self.base_weights,
            "method": self.method,
            "combine": self.combine,
            "weights": self.weights,
            "density": self.density,
            "seed": self.dare_seed,
            "dtype": self.dtype,
            "adapters": [
                {
                    "spec": adapter.spec,
                    "method": adapter.method,
                    "rank": adapter.rank,
                    "base_model": adapter.base_model,
                    "trained_quantization": adapter.trained_quantization,
                }
                for adapter in self.adapters
            ],
        }


def merge(request: MergeRequest, on_step: Callable[[str], None] | None = None) -> MergePlan:
    """Check ``request``, build the merged model and write it atomically to ``request.out``."""
    plan = plan_merge(request)
    report = on_step or (lambda step: None)
    model = build_merged_model(plan, report)
    report(STEPS[4])
    write_merged(model, plan)
    return plan


def plan_merge(request: MergeRequest) -> MergePlan:
    out = Path(request.out)
    if out.exists() and not request.overwrite:
        raise UserError(
            f"--out {out} already exists: pass --overwrite to replace it or choose another folder"
        )
    if not request.adapters:
        raise UserError("no adapter given: name at least one adapter (store name, folder or REPO_ID[@REV])")
    _check_choices(request)
    adapters = [read_adapter(spec) for spec in request.adapters]
    method = _common_method(adapters)
    combine = _combine_method(request, method, len(adapters))
    base = _choose_base(adapters, request.base)
    _check_against_base(adapters, base)
    return MergePlan(
        adapters=adapters,
        out=out,
        base=base,
        method=method,
        dtype=_output_dtype(request.dtype, base),
        base_weights=_base_weight_policy(adapters, request.base_weights),
        combine=combine,
        weights=_combine_weights(request.weights, len(adapters)) if combine else None,
        density=_density(request.density, combine),
        seed=request.seed,
        overwrite=request.overwrite,
    )


def read_adapter(spec: str) -> AdapterSource:
    """Resolve ``spec`` and check it by the adapter contract; refuse what cannot be folded into weights."""
    from adapterhub import contract
    from adapterhub.hub import resolve

    path = resolve(spec)
    peft_type = str(contract.files.read_config(path)["peft_type"]).upper()
    if peft_type in PROMPT_FAMILY:
        raise UserError(
            f"adapter '{spec}' is {PROMPT_FAMILY[peft_type]}: it adds virtual tokens or key-values at run "
            "time rather than changing weights, so it cannot be merged into a model; "
            "serve it with `adapterhub serve`"
        )
    if peft_type not in MERGEABLE_METHODS:
        raise UserError(
            f"adapter '{spec}' has method '{peft_type or '?'}': merge supports LoRA and IA3 adapters"
        )
    files = contract.read_adapter(path)
    return AdapterSource(
        spec=spec,
        path=path,
        method=MERGEABLE_METHODS[peft_type],
        base_model=files.config.get("base_model_name_or_path"),
        rank=files.config.get("r"),
        trained_quantization=_trained_quantization(path),
        files=files,
    )


def _check_against_base(adapters: list[AdapterSource], base: str) -> None:
    """Every adapter fits the chosen base the way PEFT will load it (before the base's weights load)."""
    from adapterhub import contract
    from adapterhub.models import load_config

    modules = contract.BaseModules(load_config(base))
    for adapter in adapters:
        contract.plan_for_base(adapter.files, modules)


def _trained_quantization(path: Path) -> str | None:
    """The base quantization the adapter was trained with, as an adapterhub training recipe records it."""
    recipe_file = path / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    recipe = yamlio.load_file(recipe_file) or {}
    model = recipe.get("model") if isinstance(recipe, dict) else None
    return model.get("quantization", "none") if isinstance(model, dict) else None


def _common_method(adapters: list[AdapterSource]) -> str:
    methods = {adapter.method for adapter in adapters}
    if len(methods) > 1:
        listing = ", ".join(f"{adapter.spec} ({adapter.method})" for adapter in adapters)
        raise UserError(
            f"cannot combine LoRA with IA3 adapters ({listing}): merge adapters of one method at a time"
        )
    return methods.pop()


def same_base(first: str, second: str) -> bool:
    """Two base names mean one model: equal names, one GGUF file's content, or the same local folder."""
    from adapterhub.hub.adapter import canonical_base
    from adapterhub.models import local_path

    if first == second or canonical_base(first) == canonical_base(second):
        return True
    first_path, second_path = Path(local_path(first)), Path(local_path(second))
    return first_path.is_dir() and second_path.is_dir() and first_path.resolve() == second_path.resolve()


def _choose_base(adapters: list[AdapterSource], base: str | None) -> str:
    if base is not None:
        for adapter in adapters:
            if adapter.base_model is not None and not same_base(adapter.base_model, base):
                raise UserError(
                    f"adapter '{adapter.spec}' was trained on '{adapter.base_model}', not --base '{base}': "
                    "pass the adapter's base or leave --base out"
                )
        return base
    recorded = [adapter.base_model for adapter in adapters]
    if None in recorded:
        spec = adapters[recorded.index(None)].spec
        raise UserError(f"adapter '{spec}' records no base model: pass --base MODEL")
    first = recorded[0]
    for adapter in adapters[1:]:
        if not same_base(first, adapter.base_model):
            raise UserError(
                f"adapters '{adapters[0].spec}' and '{adapter.spec}' have different bases "
                f"('{first}' vs '{adapter.base_model}'): merge adapters of one base model"
            )
    return first


def _check_choices(request: MergeRequest) -> None:
    """Refuse unknown option values before any adapter is resolved (which may download it)."""
    for option, value, choices in (
        ("--dtype", request.dtype, OUTPUT_DTYPES),
        ("--base-weights", request.base_weights, BASE_WEIGHT_POLICIES),
        ("--combine", request.combine or ALL_COMBINE_METHODS[0], ALL_COMBINE_METHODS),
    ):
        if value not in choices:
            raise UserError(f"unknown {option} '{value}': use one of {', '.join(choices)}")


def _output_dtype(choice: str, base: str) -> str:
    from adapterhub.models import DTYPE_ALIASES, DTYPES, raw_config_dict

    if choice != "auto":
        return DTYPE_ALIASES[choice]
    stored = raw_config_dict(base)
    stored_dtype = stored.get("dtype") or stored.get("torch_dtype")
    return stored_dtype if stored_dtype in DTYPES else "float32"


def _base_weight_policy(adapters: list[AdapterSource], policy: str) -> str:
    if policy != "auto":
        return policy
    on_nf4 = {adapter.trained_quantization == "nf4" for adapter in adapters}
    if len(on_nf4) > 1:
        raise UserError(
            "some adapters were trained on an NF4 base and some were not: "
            "choose --base-weights nf4 or original"
        )
    return "nf4" if on_nf4.pop() else "original"


def _combine_method(request: MergeRequest, method: str, count: int) -> str | None:
    combine = request.combine
    if combine is None:
        return "linear" if count > 1 or request.weights is not None else None
    if combine not in COMBINE_METHODS[method]:
        raise UserError(
            f"--combine {combine} works for LoRA only: IA3 adapters combine with --combine linear"
        )
    return combine


def _combine_weights(weights: list[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UserError(
            f"--weights has {len(weights)} values for {count} adapters: give one weight per adapter"
        )
    return list(weights)


def _density(density: float | None, combine: str | None) -> float | None:
    if combine not in DENSITY_METHODS:
        if density is not None:
            raise UserError(f"--density applies to --combine {', '.join(DENSITY_METHODS)} only: drop it")
        return None
    if density is None:
        raise UserError(
            f"--combine {combine} needs --density D: the fraction of each delta to keep, 0 < D <= 1"
        )
    if not 0 < density <= 1:
        raise UserError(f"--density {density} is out of range: use a value in (0, 1]")
    return density


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``, the form ``--weights`` takes."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as err:
        raise UserError(f"--weights '{text}' is not a comma-separated list of numbers: e.g. 0.7,0.3") from err


def build_merged_model(plan: MergePlan, report: Callable[[str], None]) -> PreTrainedModel:
    """The fp32 base with the plan's adapters folded in, cast to the output dtype."""
    from adapterhub.models import DTYPES

    report(STEPS[0])
    base = load_full_precision_base(plan.base, plan.base_weights)
    report(STEPS[1])
    peft_model = _attach_adapters(base, plan)
    names = list(peft_model.peft_config)
    if plan.combine is not None:
        report(STEPS[2])
        _combine(peft_model, names, plan)
        names = [COMBINED_ADAPTER]
    report(STEPS[3])
    merged = peft_model.merge_and_unload(adapter_names=names)
    return merged.to(DTYPES[plan.dtype])


def load_full_precision_base(base: str, base_weights: str) -> PreTrainedModel:
    """``base`` in fp32 on the CPU; with ``nf4`` its 4-bit-quantized linear weights are dequantized NF4."""
    import torch

    from adapterhub.models import ModelSpec, load_model

    model = load_model(ModelSpec(base, quantization="none", dtype="float32", device="cpu"))
    if base_weights == "nf4":
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, weight in dequantized_nf4_weights(base).items():
                parameters[name].copy_(weight)
    return model


def dequantized_nf4_weights(base: str) -> dict[str, torch.Tensor]:
    """Every weight NF4 loading quantizes, as training saw it: quantized the same way, then dequantized."""
    import bitsandbytes as bnb

    from adapterhub.models import ModelSpec, keep_4bit_weights_trainable, load_model

    quantized = load_model(ModelSpec(base, quantization="nf4", dtype="float32", device="cpu"))
    # Without this, bitsandbytes' CPU kernel may repack the weights and dequantize_4bit returns garbage.
    keep_4bit_weights_trainable(quantized)
    return {
        f"{name}.weight": bnb.functional.dequantize_4bit(
            module.weight.data, module.weight.quant_state
        ).float()
        for name, module in quantized.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _attach_adapters(base: PreTrainedModel, plan: MergePlan):
    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method deprecated in its favour; no news to users.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(plan.adapters[0].path), adapter_name="adapter_0")
            for index, adapter in enumerate(plan.adapters[1:], start=1):
                model.load_adapter(str(adapter.path), adapter_name=f"adapter_{index}")
    except (ValueError, RuntimeError, OSError, KeyError) as err:
        raise UserError(
            f"adapters do not load onto base '{plan.base}' ({str(err).splitlines()[0][:160]}): "
            "check that they were trained on this base"
        ) from err
    return model


def _combine(peft_model, names: list[str], plan: MergePlan) -> None:
    import torch

    # dare_* drop entries at random: a fixed seed makes the exported model reproducible.
    torch.manual_seed(plan.seed)
    if plan.method == "ia3":
        peft_model.add_weighted_adapter(names, plan.weights, COMBINED_ADAPTER)
    else:
        try:
            peft_model.add_weighted_adapter(
                names, plan.weights, COMBINED_ADAPTER, combination_type=plan.combine, density=plan.density
            )
        except ValueError as err:
            raise UserError(
                f"--combine {plan.combine} refused these adapters: {err}; try --combine cat"
            ) from err
    peft_model.set_adapter(COMBINED_ADAPTER)
    for name in names:
        peft_model.delete_adapter(name)


def write_merged(model: PreTrainedModel, plan: MergePlan) -> None:
    """Model, tokenizer, generation config and model card, written to a temp folder and renamed."""
    from adapterhub.models import load_tokenizer

    tokenizer = load_tokenizer(plan.base)
    with atomic_dir(plan.out, replace=plan.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(plan))


def model_card(plan: MergePlan) -> str:
    """A Hub model card recording the base, the adapters, their methods and the merge settings."""
    metadata: dict = {"library_name": "transformers", "tags": ["adapterhub", "merge", plan.method]}
    if HUB_ID.match(plan.base) and not Path(plan.base).exists():
        metadata["base_model"] = plan.base
    metadata["adapterhub_merge"] = plan.settings
    rows = [
        f"| `{adapter.spec}` | {adapter.method} | {adapter.rank or '-'} | {weight} | "
        f"{adapter.trained_quantization or 'unknown'} |"
        for adapter, weight in plan.weighted_adapters
    ]
    combination = (
        f"{plan.combine}, weights {', '.join(f'{w:g}' for w in plan.weights or [])}"
        + (f", density {plan.density:g}" if plan.density is not None else "")
        + (f", seed {plan.dare_seed}" if plan.dare_seed is not None else "")
        if plan.combine
        else "none (one adapter merged as trained)"
    )
    return "\n".join(
        [
            "---",
            yamlio.dumps(metadata).rstrip(),
            "---",
            "",
            f"# {plan.out.name}",
            "",
            f"`{plan.base}` with {len(plan.adapters)} {plan.method.upper()} adapter(s) folded into its "
            "weights by `adapterhub merge`. It loads with plain transformers, no PEFT needed.",
            "",
            "| setting | value |",
            "| --- | --- |",
            f"| base model | `{plan.base}` |",
            f"| base weights | {plan.base_weights} |",
            f"| combination | {combination} |",
            f"| dtype | {plan.dtype} |",
            "",
            "## Adapters",
            "",
            "| adapter | method | rank | weight | trained on quantization |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
