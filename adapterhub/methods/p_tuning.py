"""P-tuning: virtual tokens produced by a small trainable prompt encoder (MLP or LSTM)."""

from peft import PromptEncoderConfig

from adapterhub.methods import register
from adapterhub.methods.base import DROPOUT, VIRTUAL_TOKENS, Method
from adapterhub.typecheck import at_least

P_TUNING = register(
    Method(
        name="p_tuning",
        config_class=PromptEncoderConfig,
        summary="virtual tokens produced by a trainable prompt encoder",
        defaults={"num_virtual_tokens": 20, "encoder_hidden_size": 128},
        rules={
            **VIRTUAL_TOKENS,
            "encoder_hidden_size": at_least(1),
            "encoder_num_layers": at_least(1),
            "encoder_dropout": DROPOUT,
        },
    )
)
