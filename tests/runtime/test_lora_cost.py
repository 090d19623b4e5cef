"""LoRA work follows the rows, not the slots: a decode step's FLOPs do not change with the number of
resident adapters, rows without a LoRA add none, a row costs its own adapter's rank whatever ranks
are beside it, and projections no adapter targets add none (counted by ``torch.utils.flop_counter``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.runtime.batch import RowInput
from adapterhub.runtime.engine import Engine

from .references import flop_counter, make_engine


def _decode_flops(engine: Engine, slots: list[int]) -> int:
    """FLOPs of one decode forward over rows serving ``slots`` (0: base), at cache position 4."""
    decoder = engine.decoder
    batch = decoder.pack([RowInput(row, slot, [7], 4, 4, (0,)) for row, slot in enumerate(slots)])
    with flop_counter() as counter:
        decoder.forward(batch)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def engines(adapter_dirs: dict[str, Path]) -> tuple[Engine, Engine]:
    """The same two LoRAs resident in an engine with 2 slots and in one with 64."""
    loras = {name: adapter_dirs[name] for name in ("lora", "lora_rs")}
    few, many = make_engine(loras, max_adapters=2), make_engine(loras, max_adapters=64)
    for engine in (few, many):
        for name in loras:
            engine.make_resident(name)
    return few, many


def test_a_step_costs_the_same_with_2_or_64_resident_slots(engines: tuple[Engine, Engine]) -> None:
    few, many = engines
    slots = [few._lookup("lora").slot, few._lookup("lora_rs").slot, 0, 0]
    assert _decode_flops(few, slots) == _decode_flops(
        many, [many._lookup(n).slot for n in ("lora", "lora_rs")] + [0, 0]
    )


def test_base_rows_add_no_lora_work(engines: tuple[Engine, Engine]) -> None:
    few, _ = engines
    lora = few._lookup("lora").slot
    base_only = _decode_flops(few, [0, 0])
    with_lora = _decode_flops(few, [lora, 0])
    # Adding base rows to a batch with one LoRA row costs what a base row costs, no LoRA GEMM for it.
    assert _decode_flops(few, [lora, 0, 0, 0]) - with_lora == 2 * (base_only // 2)


def test_only_the_targeted_projections_do_lora_work(tmp_path: Path) -> None:
    from adapterhub.models import ModelSpec, load_model
    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    from .references import BASE

    base = load_model(ModelSpec(BASE, device="cpu"))
    rank = 8
    config = peft_config("lora", rank=rank, target_modules=["q_proj", "v_proj"])
    engine = make_engine({"qv": write_random_adapter(base, config, tmp_path / "qv", seed=3)})
    engine.make_resident("qv")
    extra = _decode_flops(engine, [engine._lookup("qv").slot, 0]) - _decode_flops(engine, [0, 0])
    layers = base.model.layers
    attention = layers[0].self_attn
    # One token: q/k/v share one shrink GEMM (k's columns of A are zero), then q's and v's expands;
    # o, k's expand and the MLP do none.
    shrink = 2 * attention.q_proj.in_features * rank * 3
    expands = 2 * rank * (attention.q_proj.out_features + attention.v_proj.out_features)
    assert extra == len(layers) * (shrink + expands)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, dict[str, Path]]:
    """An engine with LoRAs of ranks 1, 8 and 64 (all seven projections) resident, and their folders."""
    from adapterhub.models import ModelSpec, load_model
    from adapterhub.runtime.random_adapters import peft_config, write_random_adapter

    from .references import BASE

    base = load_model(ModelSpec(BASE, device="cpu"))
    folder = tmp_path_factory.mktemp("ranked")
    folders = {
        f"r{rank}": write_random_adapter(base, peft_config("lora", rank=rank), folder / f"r{rank}", seed=rank)
        for rank in (1, 8, 64)
    }
    engine = make_engine(folders, max_lora_rank=64)
    for name in folders:
        engine.make_resident(name)
    return engine, folders


@pytest.mark.parametrize(
    "layout",
    [
        ("r1", "r64"),  # every row has a LoRA: their tables gathered, a batched GEMM per rank
        ("r1", None, "r64", None),  # beside base rows: each read and added in place
    ],
)
def test_a_row_costs_its_own_rank_beside_a_wider_one(ranked, layout: tuple[str | None, ...]) -> None:
    engine, _ = ranked
    slots = [0 if name is None else engine._lookup(name).slot for name in layout]
    base = _decode_flops(engine, [0] * len(slots))
    alone = sum(_decode_flops(engine, [slot, 0]) - _decode_flops(engine, [0, 0]) for slot in slots if slot)
    assert _decode_flops(engine, slots) - base == alone


def test_ranks_1_8_and_64_in_one_batch_equal_peft(ranked) -> None:
    from .references import PROMPTS, greedy, peft_reference

    engine, folders = ranked
    rows = [(name, prompt) for name in [None, *folders] for prompt in PROMPTS[:2]]
    logits = engine.score([greedy(prompt, name) for name, prompt in rows])
    results = [engine.submit(greedy(prompt, name)) for name, prompt in rows]
    engine.start()
    try:
        tokens = [handle.result(timeout=120).token_ids for handle in results]
    finally:
        engine.stop()
    for (name, prompt), got, row_logits in zip(rows, tokens, logits, strict=True):
        want, want_logits = peft_reference(None if name is None else str(folders[name]), prompt)
        assert got == want, name
        assert (row_logits - want_logits).abs().max() <= 1e-4, name
