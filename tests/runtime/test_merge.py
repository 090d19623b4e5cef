"""Merge mode: folding one LoRA/IA3 adapter into the base, and restoring it bit-exactly."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from adapterhub.runtime.api import RequestError
from adapterhub.runtime.engine import Engine

from .references import PROMPTS, greedy, make_engine

MERGE_TOLERANCE_FP32 = 1e-4
# Measured: about 2e-6 on the tiny nf4 base in fp32 compute (see docs/runtime.md).
MERGE_TOLERANCE_NF4 = 1e-4


def _snapshot(engine: Engine) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in engine.model.state_dict().items()}


def _scores(engine: Engine, name: str | None) -> torch.Tensor:
    return engine.score([greedy(prompt, name) for prompt in PROMPTS])


@pytest.mark.parametrize("name", ["lora", "lora_rs", "ia3"])
def test_merge_matches_serving_unmerged_and_unmerge_restores_bit_exactly(
    adapter_dirs: dict[str, Path], name: str
) -> None:
    engine = make_engine(adapter_dirs)
    before = _snapshot(engine)
    want_tokens = [engine.generate(greedy(prompt, name)).token_ids for prompt in PROMPTS]
    want_logits, base_logits = _scores(engine, name), _scores(engine, None)
    engine.merge(name)
    assert engine.stats()["merged"] == name
    assert [engine.generate(greedy(prompt, name)).token_ids for prompt in PROMPTS] == want_tokens
    assert torch.allclose(_scores(engine, name), want_logits, atol=MERGE_TOLERANCE_FP32, rtol=0)
    for other in (None, "prompt"):
        with pytest.raises(RequestError) as refused:
            engine.submit(greedy(PROMPTS[0], other))
        assert refused.value.code == "bad_request"
    engine.unmerge()
    after = _snapshot(engine)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert torch.equal(_scores(engine, None), base_logits)
    assert engine.stats()["merged"] is None


def test_prompt_families_cannot_be_merged(engine: Engine) -> None:
    with pytest.raises(RequestError, match="LoRA or IA3"):
        engine.merge("prefix")


def test_merge_waits_for_running_requests(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs)
    want = engine.generate(greedy(PROMPTS[2], "ia3", max_tokens=12)).token_ids
    started = threading.Event()
    engine.start()
    try:
        running = engine.submit(
            greedy(PROMPTS[2], "ia3", max_tokens=12, on_token=lambda token, delta: started.set())
        )
        assert started.wait(timeout=30)
        engine.merge("lora")
        assert running.done
        assert running.result().token_ids == want
        engine.unmerge()
    finally:
        engine.stop()


def test_nf4_merge_uses_a_dequantized_copy_with_small_measured_error(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs, quantization="nf4")
    packed = _snapshot(engine)
    unmerged = _scores(engine, "lora")
    want_tokens = [engine.generate(greedy(prompt, "lora")).token_ids for prompt in PROMPTS]
    engine.merge("lora")
    error = (_scores(engine, "lora") - unmerged).abs().max().item()
    assert 0 < error < MERGE_TOLERANCE_NF4
    assert [engine.generate(greedy(prompt, "lora")).token_ids for prompt in PROMPTS] == want_tokens
    engine.unmerge()
    assert all(torch.equal(packed[key], value) for key, value in _snapshot(engine).items())
    assert torch.equal(_scores(engine, "lora"), unmerged)
