"""Gemma 1, 2 and 3 (text): scaled embeddings and (1 + w) RMS norms (both from the Hugging Face modules),
attention scaled by ``query_pre_attn_scalar``; Gemma 2 adds sandwich norms, attention and output
softcaps and alternating sliding-window layers; Gemma 3 adds q/k norms and a rotary embedding per
layer type (local and global)."""

from transformers import PretrainedConfig

from adapterhub.runtime.families import Family, head_dim, register


def query_pre_attn_scale(config: PretrainedConfig) -> float:
    return (getattr(config, "query_pre_attn_scalar", None) or head_dim(config)) ** -0.5


GEMMA = register(Family(name="gemma", model_types=("gemma",)))
GEMMA2 = register(
    Family(
        name="gemma2",
        model_types=("gemma2",),
        sandwich_norms=True,
        query_scale=query_pre_attn_scale,
        attention_softcap="attn_logit_softcapping",
        final_softcap="final_logit_softcapping",
    )
)
GEMMA3 = register(
    Family(
        name="gemma3",
        model_types=("gemma3_text",),
        sandwich_norms=True,
        qk_norm=True,
        query_scale=query_pre_attn_scale,
        attention_softcap="attn_logit_softcapping",
        final_softcap="final_logit_softcapping",
        rotary_per_layer_type=True,
    )
)
