"""Deterministic tiny random models with a locally trained tokenizer, for offline tests and demos.

Every width is a multiple of 64: bitsandbytes' CPU 4-bit kernels crash on other shapes.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from adapterhub.errors import UserError
from adapterhub.paths import atomic_dir, home
from adapterhub.synthetic import tokenizer_corpus

ARCHES = ("llama", "mt5")
BUILTIN_PREFIX = "builtin:"
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) trained on the synthetic corpus."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def tiny_config(arch: str) -> PretrainedConfig:
    ids = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **ids,
        )
    if arch == "mt5":
        from transformers import MT5Config

        return MT5Config(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            tie_word_embeddings=False,
            **ids,
        )
    raise UserError(f"unknown tiny architecture '{arch}': choose one of {', '.join(ARCHES)}")


def write_tiny(out_dir: Path, arch: str = "llama", seed: int = 0, *, replace: bool = False) -> Path:
    """Write a tiny random model and its tokenizer to ``out_dir`` (atomically) and return the path."""
    config = tiny_config(arch)
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace:
        raise UserError(f"output folder {out_dir} already exists: choose a new path or remove it")
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    with atomic_dir(out_dir, replace=replace) as tmp:
        model.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
    return out_dir


def _builtin_arch(name: str) -> str:
    arch = name.removeprefix(BUILTIN_PREFIX).removeprefix("tiny-")
    if arch not in ARCHES:
        raise UserError(f"unknown builtin model '{name}': use builtin:tiny-llama or builtin:tiny-mt5")
    return arch


def builtin_config(name: str) -> PretrainedConfig:
    """A builtin model's config, without building the model."""
    return tiny_config(_builtin_arch(name))


def builtin_path(name: str) -> Path:
    """The local folder of ``builtin:tiny-llama`` or ``builtin:tiny-mt5``, created on first use."""
    arch = _builtin_arch(name)
    path = home() / "builtin" / f"tiny-{arch}"
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (torchrun ranks, parallel tests) may ask at once: one builds, the others wait.
    with open(path.parent / f".tiny-{arch}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").exists():
            write_tiny(path, arch, replace=True)
    return path
