"""IA3: learned vectors that rescale keys, values and feed-forward activations."""

from peft import IA3Config

from adapterhub.methods import register
from adapterhub.methods.base import Method

IA3 = register(
    Method(
        name="ia3",
        config_class=IA3Config,
        summary="learned per-channel scales on keys, values and feed-forward inputs",
    )
)
