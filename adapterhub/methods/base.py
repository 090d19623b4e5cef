"""What every PEFT method provides: its name, its PEFT config class and how recipe keys become that config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from adapterhub.errors import UserError, did_you_mean
from adapterhub.typecheck import Rule, at_least, between, field_hints, problem

# Set by adapterhub from the model and run, never by a recipe.
MANAGED_KEYS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
    }
)
# Allowed values of the numeric PEFT parameters every method that has them shares.
DROPOUT = between(0, 1, high_open=True)
VIRTUAL_TOKENS = {"num_virtual_tokens": at_least(1)}


@dataclass(frozen=True)
class BuildContext:
    """Facts about the run a method may need to finish its config."""

    task_type: str  # "CAUSAL_LM" or "SEQ_2_SEQ_LM"
    base_model: str  # the Hub id or builtin name recorded in the adapter
    tokenizer_path: str  # where PEFT can load the tokenizer from, for text-initialised prompts
    weights_available: bool = True  # False when the model is random or on the meta device


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[PeftConfig]
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    rules: Mapping[str, Rule] = field(default_factory=dict)  # allowed values of numeric parameters

    @property
    def is_prompt_learning(self) -> bool:
        return self.config_class().is_prompt_learning

    def parameter_hints(self) -> dict[str, Any]:
        return {k: v for k, v in field_hints(self.config_class).items() if k not in MANAGED_KEYS}

    def check_params(self, values: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Validate recipe keys against this method's PEFT config; return them with our defaults filled in."""
        hints = self.parameter_hints()
        for key, value in values.items():
            if key not in hints:
                raise UserError(
                    f"{source}: method.{key}: not a {self.name} parameter{did_you_mean(str(key), hints)}; "
                    f"known: {', '.join(hints)}"
                )
            wrong = problem(value, hints[key], self.rules.get(key))
            if wrong:
                raise UserError(f"{source}: method.{key}: {wrong}")
        return {**self.defaults, **values}

    def finish(self, params: dict[str, Any], context: BuildContext) -> dict[str, Any]:
        """Fill in what depends on the run; methods override this when they need to."""
        return params

    def peft_config(self, params: Mapping[str, Any], context: BuildContext) -> PeftConfig:
        params = self.finish(dict(params), context)
        try:
            config = self.config_class(task_type=context.task_type, **params)
        except (ValueError, TypeError) as err:
            raise UserError(f"method {self.name}: {str(err).splitlines()[0]}") from err
        config.base_model_name_or_path = context.base_model
        return config
