"""The PEFT fallback serves the bases the fast runtime has no family for, exactly, behind the same
Engine interface: MT5 (encoder-decoder) and GPT-2 (Conv1D projections), all five families and base
rows submitted together, against plain PEFT with a fresh base per adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config

from adapterhub.models import ModelSpec, load_model
from adapterhub.runtime.api import GenerationRequest, RequestError, SamplingParams
from adapterhub.runtime.backends import open_engine
from adapterhub.runtime.engine import Engine
from adapterhub.runtime.fallback import FallbackEngine
from adapterhub.runtime.random_adapters import peft_config, write_random_adapter
from adapterhub.runtime.serving import EngineConfig
from adapterhub.tiny import build_tokenizer

pytestmark = pytest.mark.slow

FAMILIES = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
PROMPTS = ([5, 70, 81, 99, 120, 7], [9, 44, 3, 7], [12, 13, 14, 15])  # two share a length: one batch
NEW_TOKENS = 5


def _gpt2(root: Path) -> str:
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    folder = root / "gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["mt5", "gpt2"])
def served(request, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    base = "builtin:tiny-mt5" if request.param == "mt5" else _gpt2(root)
    task = "SEQ_2_SEQ_LM" if request.param == "mt5" else "CAUSAL_LM"
    writer = load_model(ModelSpec(base, device="cpu"))
    folders = {
        family: write_random_adapter(
            writer, peft_config(family, task_type=task, llama_targets=False), root / family, seed=seed
        )
        for seed, family in enumerate(FAMILIES, start=1)
    }
    engine = open_engine(EngineConfig(base=base, device="cpu", max_batch_size=4))
    for family, folder in folders.items():
        engine.register(family, str(folder))
    return base, folders, engine


def _peft(base: str, folder: Path | None, ids: list[int], eos: set[int]) -> tuple[list[int], torch.Tensor]:
    """PEFT's greedy tokens (up to, without, the first EOS) and first-step logits, one adapter alone."""
    model = load_model(ModelSpec(base, device="cpu")).eval()
    if folder is not None:
        model = PeftModel.from_pretrained(model, str(folder)).eval()
    prompt = torch.tensor([ids])
    mask = torch.ones_like(prompt)
    seq2seq = model.config.is_encoder_decoder
    with torch.no_grad():
        extra = {"decoder_input_ids": torch.tensor([[0]])} if seq2seq else {}
        logits = model(input_ids=prompt, attention_mask=mask, **extra).logits[0, -1].float()
        out = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
    tokens = out[0, 1:].tolist() if seq2seq else out[0, len(ids) :].tolist()
    cut = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
    return tokens[:cut], logits


def test_a_base_without_a_family_gets_the_fallback(served) -> None:
    _, _, engine = served
    assert isinstance(engine, FallbackEngine) and not isinstance(engine, Engine)
    assert engine.backend == "PEFT fallback: one adapter per batch"
    assert {info.method for info in engine.list()} == set(FAMILIES)


def test_every_family_and_the_base_equal_peft(served) -> None:
    base, folders, engine = served
    rows = [(name, ids) for name in [None, *FAMILIES] for ids in PROMPTS]
    requests = [
        GenerationRequest(list(ids), name, SamplingParams(max_tokens=NEW_TOKENS)) for name, ids in rows
    ]
    logits = engine.score(requests)
    handles = [engine.submit(request) for request in requests]
    engine.start()
    try:
        results = [handle.result(timeout=300) for handle in handles]
    finally:
        engine.stop()
    for (name, ids), result, row_logits in zip(rows, results, logits, strict=True):
        want, want_logits = _peft(base, None if name is None else folders[name], ids, engine.eos_ids)
        assert result.token_ids == want, (name, ids)
        assert (row_logits - want_logits).abs().max() <= 1e-4, name
    assert engine.stats()["last_batch_size"] >= 1


def test_streaming_stop_strings_and_sampling_work_as_in_the_fast_engine(served) -> None:
    _, _, engine = served
    deltas: list[str] = []
    streamed = engine.generate(
        GenerationRequest(
            PROMPTS[0],
            "lora",
            SamplingParams(max_tokens=6),
            on_token=lambda token, delta: deltas.append(delta),
        )
    )
    assert "".join(deltas) == streamed.text
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    first = engine.generate(GenerationRequest(PROMPTS[1], "ia3", seeded))
    assert engine.generate(GenerationRequest(PROMPTS[1], "ia3", seeded)).token_ids == first.token_ids


def test_echo_is_refused_on_an_encoder_decoder(served) -> None:
    _, _, engine = served
    if not engine.seq2seq:
        pytest.skip("decoder bases score their prompts")
    with pytest.raises(RequestError, match="encoder-decoder"):
        engine.submit(GenerationRequest(PROMPTS[0], None, SamplingParams(max_tokens=0, prompt_logprobs=0)))
