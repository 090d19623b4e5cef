"""Prompt tuning: trainable virtual-token embeddings prepended to every input."""

from typing import Any

from peft import PromptTuningConfig

from adapterhub.methods import register
from adapterhub.methods.base import VIRTUAL_TOKENS, BuildContext, Method


class PromptTuning(Method):
    def finish(self, params: dict[str, Any], context: BuildContext) -> dict[str, Any]:
        if params.get("prompt_tuning_init_text") and "prompt_tuning_init" not in params:
            params["prompt_tuning_init"] = "TEXT"
        if str(params.get("prompt_tuning_init", "")).upper() == "TEXT":
            if not context.weights_available:
                # Text init only sets starting values; without real weights or a tokenizer it can't run.
                params["prompt_tuning_init"] = "RANDOM"
                params.pop("prompt_tuning_init_text", None)
            else:
                params.setdefault("tokenizer_name_or_path", context.tokenizer_path)
        return params


PROMPT_TUNING = register(
    PromptTuning(
        name="prompt_tuning",
        config_class=PromptTuningConfig,
        summary="trainable virtual-token embeddings prepended to the input",
        defaults={"num_virtual_tokens": 20},
        rules=VIRTUAL_TOKENS,
    )
)
