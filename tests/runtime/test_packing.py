"""Packed forwards: a new request is prefilled in the same forward as the running rows' next tokens,
and prompts of different lengths cost their own tokens only, with no pad position in any GEMM."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub.runtime.batch import RowInput
from adapterhub.runtime.engine import Engine

from .references import NEW_TOKENS, PROMPTS, flop_counter, greedy, make_engine, peft_reference

GEMMS = ("mm", "addmm", "bmm", "addmm_", "baddbmm_")


def _gemm_flops(engine: Engine, inputs: list[RowInput]) -> int:
    """GEMM FLOPs of one forward, counted on ATen's own GEMMs (the counter has no formula for the
    oneDNN-prepacked projections, so they are set aside here)."""
    decoder = engine.decoder
    for target in decoder.targets.values():
        target.packed = None
    with flop_counter() as counter:
        decoder.forward(decoder.pack(inputs))
    counts = counter.get_flop_counts()["Global"]
    return sum(flops for op, flops in counts.items() if str(op).split(".")[-1] in GEMMS)


def test_prompts_of_different_lengths_multiply_no_pad_position(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine({"lora": adapter_dirs["lora"]})
    lora = engine.make_resident("lora")
    short = RowInput(0, 0, [5] * 3, 0, 0, (2,))
    long = RowInput(1, lora, [7] * 9, 0, 0, (8,))
    apart = _gemm_flops(engine, [short]) + _gemm_flops(engine, [RowInput(0, lora, [7] * 9, 0, 0, (8,))])
    assert _gemm_flops(engine, [short, long]) == apart


def test_an_arrival_is_prefilled_in_the_forward_of_the_running_rows(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine(adapter_dirs)
    forwards = []
    forward = engine.decoder.forward

    def counted(batch):
        forwards.append(batch.token_ids.shape[0])
        return forward(batch)

    engine.decoder.forward = counted
    engine._running = True  # stepped by hand, so the arrival falls between two known steps
    first = engine.submit(greedy(PROMPTS[2], "lora"))
    engine._step()
    engine._step()
    late = {name: engine.submit(greedy(PROMPTS[i], name)) for i, name in enumerate(("prompt", "prefix"))}
    before = len(forwards)
    engine._step()
    assert len(forwards) == before + 1, "the arrivals' prefill and the running row's decode share one forward"
    tokenizer = engine.tokenizer
    prompt_tokens = len(tokenizer(PROMPTS[0])["input_ids"]) + len(tokenizer(PROMPTS[1])["input_ids"])
    # Both prompt adapters' K/V are copied ahead of their prompts: the prompt-tuning adapter's 4
    # virtual tokens ran through the base once, when it loaded.
    assert forwards[-1] == 1 + prompt_tokens
    while not all(handle.done for handle in (first, *late.values())):
        engine._step()
    assert first.result().token_ids == peft_reference(str(adapter_dirs["lora"]), PROMPTS[2])[0]
    for index, (name, handle) in enumerate(late.items()):
        assert handle.result().token_ids == peft_reference(str(adapter_dirs[name]), PROMPTS[index])[0]
    assert len(first.result().token_ids) == NEW_TOKENS


def test_an_ia3_row_beside_long_prompts_scales_only_its_own_tokens(adapter_dirs: dict[str, Path]) -> None:
    engine = make_engine({"ia3": adapter_dirs["ia3"]})
    ia3 = engine.make_resident("ia3")
    decoder = engine.decoder
    base_rows = [RowInput(row, 0, [5 + row] * 40, 0, 0, (39,)) for row in range(2)]
    ia3_row = RowInput(2, ia3, [9, 4, 7, 3, 8], 0, 0, (4,))
    batch = decoder.pack([*base_rows, ia3_row])
    assert batch.adapters.ia3_stretches == ((ia3, 80, 85),)
    together = decoder.forward(batch)
    # Alone, the IA3 row has no token to leave out and is scaled by a gather over its tokens.
    alone_batch = decoder.pack([ia3_row])
    assert alone_batch.adapters.ia3_stretches is None
    alone = [decoder.forward(decoder.pack([row])) for row in base_rows]
    alone.append(decoder.forward(alone_batch))
    for row_logits, want in zip(together, alone, strict=True):
        assert torch.allclose(row_logits, want[0], atol=1e-5, rtol=0)
    # A decode step's few tokens are all scaled by the gather.
    step = [RowInput(row, slot, [3], 40, 40, (0,)) for row, slot in ((0, 0), (1, 0), (2, ia3))]
    assert decoder.pack(step).adapters.ia3_stretches is None
