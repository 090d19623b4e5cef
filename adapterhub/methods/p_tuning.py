"""P-tuning: virtual tokens produced by a small trainable prompt encoder (MLP or LSTM)."""

from peft import PromptEncoderConfig

from adapterhub.methods import register
from adapterhub.methods.base import Method

P_TUNING = register(
    Method(
        name="p_tuning",
        config_class=PromptEncoderConfig,
        summary="virtual tokens produced by a trainable prompt encoder",
        defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128},
    )
)
