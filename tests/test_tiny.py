import hashlib
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from adapterhub.errors import UserError
from adapterhub.tiny import write_tiny


def test_tiny_models_load_offline(tiny_llama: Path, tiny_mt5: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|assistant|>\n")
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    mt5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_mt5)
    for config in (llama.config, mt5.config):
        widths = [
            getattr(config, k)
            for k in ("hidden_size", "intermediate_size", "d_model", "d_ff")
            if isinstance(getattr(config, k, None), int)
        ]
        assert widths and all(w % 64 == 0 for w in widths)


def test_tiny_is_deterministic(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        out = write_tiny(tmp_path / name, "llama")
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert digests[0] == digests[1]


def test_tiny_refuses_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="already exists"):
        write_tiny(tmp_path, "llama")
