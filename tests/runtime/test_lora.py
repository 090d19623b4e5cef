"""A LoRA group's products against the same arithmetic done by hand, token by token, over forwards
of different widest ranks in turn (the group keeps its tables' rank-cut views between forwards)."""

from __future__ import annotations

import pytest
import torch

from adapterhub.runtime.batch import SlotFeatures, adapter_rows
from adapterhub.runtime.lora import LoraGroup

IN_FEATURES, OUT_FEATURES, MAX_RANK = 6, [5, 3], 8
RANKS = {slot: (8, 2, 4, 1)[(slot - 1) % 4] for slot in range(1, 12)}  # slot 0 is the base


@pytest.fixture(scope="module")
def group() -> tuple[LoraGroup, dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]]:
    """A group of two members with adapters of ranks 8, 2, 4 and 1 in turn in slots 1 to 11, and each
    one's A and B."""
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    lora = LoraGroup(names, IN_FEATURES, OUT_FEATURES, 12, MAX_RANK, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for slot, rank in RANKS.items():
        for member, out in enumerate(OUT_FEATURES):
            a = torch.randn(rank, IN_FEATURES, generator=generator)
            b = torch.randn(rank, out, generator=generator)
            slot_a, slot_b = lora.slot_views(slot, member)
            slot_a[:rank], slot_b[:rank] = a, b
            weights[slot, member] = (a, b)
    return lora, weights


@pytest.mark.parametrize(
    "token_slots",
    [
        [2, 2, 2],  # one adapter, rank 2
        [1, 1, 0],  # one adapter and a base token, rank 8
        [1, 2, 1, 2],  # two adapters in consecutive slots, tokens apart: one block, tokens gathered
        [2, 0, 2],  # rank 2 again, after rank 8
        [1, 1, 2, 2],  # two adapters in order: accumulated inside the batched GEMM
        [1, 2, 2],  # short stretches of two lengths: a table gathered per token
        [1, 1, 2, 2, 2],  # stretches of two lengths, each multiplied in place
        [1, 0, 2],  # two adapters beside a base token, a stretch each: read and added in place
        [0, 2, 2, 1, 1, 1],  # stretches in place, in the forward in another order than the slots'
        [1, 2, 0, 1],  # one adapter's tokens apart: gathered, not read in place
        [1, 2, 3, 4, 6, 7, 8, 9],  # two blocks of four consecutive slots, each over a view of theirs
        [1, 3, 5, 7, 9],  # five adapters in slots apart: their tables gathered
        [0, 3, 4, 5, 0, 9],  # a block of three and one of one, read and added in the forward
        [0, 1, 3, 5, 7, 9],  # five adapters in the forward: their tables gathered
        [0, 0, 1, 2, 1, 2],  # consecutive slots whose tokens interleave: one block, tokens gathered
        [4, 4, 4, 3, 3, 3],  # a block whose tokens lie in the forward in the other order
        [3, 7, 1, 5, 9],  # every token, tables gathered: ranks 4 and 8, a batched GEMM each
        [1, 5, 9, 2, 6],  # the same, with the tokens gathered
    ],
)
def test_each_token_gets_its_own_adapters_product(group, token_slots: list[int]) -> None:
    lora, weights = group
    features = [SlotFeatures()] + [
        SlotFeatures(lora={name: RANKS[slot] for name in lora.names}) for slot in RANKS
    ]
    rows = adapter_rows(token_slots, features, "cpu").lora
    x = torch.randn(len(token_slots), IN_FEATURES)
    shrunk = lora.shrink(x, rows)
    for member, width in enumerate(OUT_FEATURES):
        base = torch.randn(len(token_slots), width)
        expected = base.clone()
        for token, slot in enumerate(token_slots):
            if slot:
                a, b = weights[slot, member]
                expected[token] += (x[token] @ a.t()) @ b
        out = lora.expand(member, shrunk, rows, base.clone())
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("token_slots", "blocks", "starts", "pieces"),
    [
        ([1, 2, 3, 4, 6, 7, 8, 9], ((1, 4, 0, 4, 8), (6, 4, 4, 8, 8)), None, None),
        ([1, 3, 5, 7, 9], None, None, [(8, 0, 5, [1, 3, 5, 7, 9])]),
        ([0, 3, 4, 5, 0, 9], ((3, 3, 0, 3, 8), (9, 1, 3, 4, 8)), (1, 5), None),
        ([0, 1, 3, 5, 7, 9], None, None, [(8, 0, 5, [1, 3, 5, 7, 9])]),
        ([0, 0, 1, 2, 1, 2], ((1, 2, 0, 4, 8),), None, None),
        ([4, 4, 4, 3, 3, 3], ((3, 1, 0, 3, 8), (4, 1, 3, 6, 8)), (3, 0), None),
        ([1, 2, 2], None, None, [(8, 0, 3, [1, 2, 2])]),  # short stretches of two lengths: per token
        ([1, 1, 2, 2, 2], ((1, 1, 0, 2, 8), (2, 1, 2, 5, 8)), None, None),  # long ones: each in place
    ],
)
def test_tables_are_read_in_place_unless_a_forward_takes_too_many_blocks(
    token_slots: list[int], blocks: tuple | None, starts: tuple | None, pieces: list | None
) -> None:
    """Adapters of one rank in consecutive slots with stretches of one length share a block over a
    view of their tables; only a forward of many blocks for its adapters gathers their tables."""
    features = [SlotFeatures()] + [SlotFeatures(lora={"m": MAX_RANK}) for _ in RANKS]
    _assert_layout(adapter_rows(token_slots, features, "cpu").lora, blocks, starts, pieces)


@pytest.mark.parametrize(
    ("token_slots", "blocks", "starts", "pieces"),
    [
        # Consecutive slots of ranks 8, 2, 4 and 1: a block each, at its own rank, smallest first.
        (
            [1, 2, 3, 4],
            ((4, 1, 0, 1, 1), (2, 1, 1, 2, 2), (3, 1, 2, 3, 4), (1, 1, 3, 4, 8)),
            (3, 1, 2, 0),
            None,
        ),
        # Gathered tables: one batched GEMM for the rank-2 adapters, one for the rank-8 ones.
        ([1, 5, 9, 2, 6], None, None, [(2, 0, 2, [2, 6]), (8, 2, 5, [1, 5, 9])]),
        ([3, 7, 1, 5, 9], None, None, [(4, 0, 2, [3, 7]), (8, 2, 5, [1, 5, 9])]),
    ],
)
def test_adapters_of_different_ranks_multiply_at_their_own(
    token_slots: list[int], blocks: tuple | None, starts: tuple | None, pieces: list | None
) -> None:
    features = [SlotFeatures()] + [SlotFeatures(lora={"m": RANKS[slot]}) for slot in RANKS]
    _assert_layout(adapter_rows(token_slots, features, "cpu").lora, blocks, starts, pieces)


def _assert_layout(rows, blocks: tuple | None, starts: tuple | None, pieces: list | None) -> None:
    assert (rows.blocks, rows.starts) == (blocks, starts)
    laid = None if rows.pieces is None else [(r, a, b, slots.tolist()) for r, a, b, slots in rows.pieces]
    assert laid == pieces


def test_a_slot_reloaded_with_another_rank_multiplies_at_its_new_rank() -> None:
    """One adapter on every token takes the slot's cached views; a slot that gets an adapter of
    another rank must not reuse the views cut at the old one."""
    names = ["model.layers.0.self_attn.o_proj"]
    lora = LoraGroup(names, IN_FEATURES, [4], 2, MAX_RANK, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, IN_FEATURES, generator=generator)
    for rank in (2, 8, 2):
        a = torch.randn(rank, IN_FEATURES, generator=generator)
        b = torch.randn(rank, 4, generator=generator)
        slot_a, slot_b = lora.slot_views(1, 0)
        slot_a.zero_(), slot_b.zero_()
        slot_a[:rank], slot_b[:rank] = a, b
        features = [SlotFeatures(), SlotFeatures(lora={names[0]: rank})]
        rows = adapter_rows([1, 1, 1], features, "cpu").lora
        base = torch.randn(3, 4, generator=generator)
        out = lora.expand(0, lora.shrink(x, rows), rows, base.clone())
        torch.testing.assert_close(out, base + (x @ a.t()) @ b, rtol=1e-5, atol=1e-5)
