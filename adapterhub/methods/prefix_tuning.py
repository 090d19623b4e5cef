"""Prefix tuning: trainable key/value vectors prepended to the attention of every layer."""

from peft import PrefixTuningConfig

from adapterhub.methods import register
from adapterhub.methods.base import VIRTUAL_TOKENS, Method
from adapterhub.typecheck import at_least

PREFIX_TUNING = register(
    Method(
        name="prefix_tuning",
        config_class=PrefixTuningConfig,
        summary="trainable key/value prefixes in every attention layer",
        defaults={"num_virtual_tokens": 20},
        rules={**VIRTUAL_TOKENS, "encoder_hidden_size": at_least(1)},
    )
)
