"""LoRA: a trainable low-rank update B·A added to frozen weight matrices (QLoRA: on a 4-bit base)."""

from peft import LoraConfig

from adapterhub.methods import register
from adapterhub.methods.base import Method

LORA = register(
    Method(
        name="lora",
        config_class=LoraConfig,
        summary="low-rank update ΔW = (α/r)·B·A on chosen linear layers",
        defaults={"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    )
)
