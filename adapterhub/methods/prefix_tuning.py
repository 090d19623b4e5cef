"""Prefix tuning: trainable key/value vectors prepended to the attention of every layer."""

from peft import PrefixTuningConfig

from adapterhub.methods import register
from adapterhub.methods.base import Method

PREFIX_TUNING = register(
    Method(
        name="prefix_tuning",
        config_class=PrefixTuningConfig,
        summary="trainable key/value prefixes in every attention layer",
        defaults={"num_virtual_tokens": 20},
    )
)
