"""bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights on the first no-grad forward.

After that, gradients through the base stop and ``dequantize_4bit`` returns garbage. These tests
fail if adapterhub's loading stops guarding against it.
"""

import torch
from peft import LoraConfig, get_peft_model

from adapterhub.models import ModelSpec, load_model


def lora_grads_after_no_grad_forward() -> dict[str, float]:
    model = load_model(ModelSpec("builtin:tiny-llama", quantization="nf4"))
    ids = torch.tensor([[5, 40, 77, 90, 120, 33]])
    with torch.no_grad():
        model(input_ids=ids)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {
        name: 0.0 if p.grad is None else p.grad.abs().sum().item()
        for name, p in peft_model.named_parameters()
        if p.requires_grad
    }


def test_training_on_4bit_after_no_grad_forward_keeps_gradients() -> None:
    grads = lora_grads_after_no_grad_forward()
    first_layer = [value for name, value in grads.items() if ".layers.0." in name]
    assert first_layer and all(value > 0 and value == value for value in grads.values())


def test_dequantize_after_no_grad_forward_is_unchanged() -> None:
    import bitsandbytes.functional as F

    model = load_model(ModelSpec("builtin:tiny-llama", quantization="nf4"))
    layer = model.model.layers[0].self_attn.q_proj
    before = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 40, 77]]))
    after = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(after, before)


def test_every_4bit_layer_is_guarded() -> None:
    model = load_model(ModelSpec("builtin:tiny-llama", quantization="nf4"))
    flags = [
        m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    ]
    assert len(flags) == 14 and not any(flags)
