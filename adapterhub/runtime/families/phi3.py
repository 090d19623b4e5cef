"""Phi-3 and Phi-4-mini: fused ``qkv_proj`` and ``gate_up_proj`` (PEFT targets them as one module each),
partial rotary embeddings on Phi-4-mini (the rotary module gives the rotated width)."""

from adapterhub.runtime.families import Family, register

PHI3 = register(
    Family(
        name="phi3",
        model_types=("phi3",),
        qkv=("qkv_proj",),
        gate_up=("gate_up_proj",),
        activation="activation_fn",
    )
)
