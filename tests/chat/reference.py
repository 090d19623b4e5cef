"""What plain PEFT answers greedily to a conversation: the ground truth the chat must show."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.models import ModelSpec, load_model, load_tokenizer


def peft_greedy(adapter: Path | None, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """A fresh base per adapter: two PeftModels around one base object answer wrongly."""
    from peft import PeftModel

    tokenizer = load_tokenizer("builtin:tiny-llama")
    model = load_model(ModelSpec("builtin:tiny-llama"))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
