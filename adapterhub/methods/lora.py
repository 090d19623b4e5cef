"""LoRA: a trainable low-rank update B·A added to frozen weight matrices (QLoRA: on a 4-bit base)."""

from peft import LoraConfig

from adapterhub.methods import register
from adapterhub.methods.base import DROPOUT, Method
from adapterhub.typecheck import above, at_least

LORA = register(
    Method(
        name="lora",
        config_class=LoraConfig,
        summary="low-rank update ΔW = (α/r)·B·A on chosen linear layers",
        defaults={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
        rules={
            "r": at_least(1),
            "lora_alpha": above(0),
            "lora_dropout": DROPOUT,
            "layers_to_transform": at_least(0),
            "qalora_group_size": at_least(1),
            "alora_invocation_tokens": at_least(0),
        },
    )
)
