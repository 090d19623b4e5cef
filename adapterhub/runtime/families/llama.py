"""Llama and the decoders built like it: SmolLM, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3
(q/k norms). Pre-norm blocks, separate q/k/v and gate/up projections."""

from adapterhub.runtime.families import Family, register

LLAMA = register(Family(name="llama", model_types=("llama", "mistral", "qwen2")))
QWEN3 = register(Family(name="qwen3", model_types=("qwen3",), qk_norm=True))
