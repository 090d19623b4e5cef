"""What one forward computes: the packed tokens of many rows, and the adapter features they need.

A forward runs over one flat list of tokens: a decoding row brings its last token, a new row its
whole prompt, and both kinds share one forward. No position is padding in the
projections and MLPs, where the work is. Attention needs each row's queries side by side, so its
tokens are laid into a (rows × longest) grid per *attention group*: rows with one token form one
group and prefilling rows another, so a long prompt never pads a decoding row to its length. The
padding lives only in that grid and is masked away.

Everything here is planned on the host from Python lists and sent to the device once per forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby

import torch

from adapterhub.runtime.lora import LoraRows


@dataclass
class SlotFeatures:
    """What a slot's occupant wrote, to plan batches and to reset on the next load."""

    lora: dict[str, int] = field(default_factory=dict)  # module -> rank
    embedding_lora: int = 0  # rank
    ia3: dict[str, bool] = field(default_factory=dict)  # module -> on its input
    dora: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    tied_tokens: bool = False

    @property
    def lora_rank(self) -> int:
        return max(self.lora.values(), default=0)


@dataclass(frozen=True)
class AdapterRows:
    """Which adapter features a set of tokens needs, derived from the slots of their rows."""

    slots: torch.Tensor  # (tokens,) the slot each token's row serves (0: base)
    lora: LoraRows | None = None  # tokens with a LoRA on a projection or the output head
    embedding_lora: LoraRows | None = None
    ia3: bool = False
    # (slot, start, stop): the stretches of tokens whose rows have IA3, when only they are scaled
    # (``ia3_stretches``); None: every token is, by its slot's vectors (ones where it has none).
    ia3_stretches: tuple[tuple[int, int, int], ...] | None = None
    dora: bool = False
    bias: bool = False
    tokens: bool = False  # some row's adapter replaces embedding rows
    tied_tokens: bool = False  # ... and the rows of a tied output head

    @property
    def key(self) -> tuple:
        """What a captured decode graph depends on besides shapes."""
        return (
            self.lora.rank if self.lora else 0,
            self.embedding_lora.rank if self.embedding_lora else 0,
            self.ia3,
            self.dora,
            self.bias,
            self.tokens,
            self.tied_tokens,
        )


def adapter_rows(
    token_slots: list[int],
    features: list[SlotFeatures],
    device: str,
    static_slots: torch.Tensor | None = None,
) -> AdapterRows:
    """The features a forward over tokens of rows serving ``token_slots`` needs.

    With ``static_slots`` (a captured decode graph replays every row) LoRA runs over all tokens, base
    and idle rows reading slot 0's zero tables; otherwise only the LoRA tokens are computed.
    """
    distinct = set(token_slots)
    used = [features[slot] for slot in distinct]
    lora_rank = {slot: features[slot].lora_rank for slot in distinct}
    embedding_rank = {slot: features[slot].embedding_lora for slot in distinct}
    slots = static_slots if static_slots is not None else torch.tensor(token_slots, device=device)
    ia3 = any(f.ia3 for f in used)
    return AdapterRows(
        slots=slots,
        lora=_lora_rows(
            token_slots,
            lora_rank,
            device,
            static_slots,
            modules=frozenset().union(*(features[slot].lora for slot in distinct)),
        ),
        embedding_lora=_lora_rows(token_slots, embedding_rank, device, static_slots),
        ia3=ia3,
        ia3_stretches=ia3_stretches(token_slots, features) if ia3 and static_slots is None else None,
        dora=any(f.dora for f in used),
        bias=any(f.bias for f in used),
        tokens=any(f.token_ids for f in used),
        tied_tokens=any(f.tied_tokens for f in used),
    )


# A stretch costs a few dispatches per scaled projection (slicing its rows and its slot's vector,
# and multiplying in place), a few µs; the gather's work on the tokens it would have left alone grows
# with their number. 32 per stretch is a conservative line: decode steps, a token a row, keep it.
IA3_STRETCH_TOKENS = 32


def _stretches(token_slots: list[int], keep: Callable[[int], bool]) -> list[list[int]]:
    """[slot, start, stop] of each stretch of consecutive tokens of one slot that ``keep`` takes."""
    stretches: list[list[int]] = []
    for index, slot in enumerate(token_slots):
        if not keep(slot):
            continue
        if stretches and stretches[-1][0] == slot and stretches[-1][2] == index:
            stretches[-1][2] = index + 1
        else:
            stretches.append([slot, index, index + 1])
    return stretches


def ia3_stretches(
    token_slots: list[int], features: list[SlotFeatures]
) -> tuple[tuple[int, int, int], ...] | None:
    """The stretches (slot, start, stop) of consecutive tokens whose rows have IA3, if scaling only
    them costs less than scaling every token (by ones where a row has none): when the tokens they
    leave out number at least ``IA3_STRETCH_TOKENS`` per stretch, as a long prompt beside an IA3 row
    in a prefill does. Measured on the families bench's prefill (two IA3 rows of 32 tokens among
    256, the 360M shape): 8.6 ms of IA3 scaling instead of 17.4 (medians of 12 forwards)."""
    stretches = _stretches(token_slots, lambda slot: bool(features[slot].ia3))
    left_out = len(token_slots) - sum(stop - start for _, start, stop in stretches)
    if left_out < IA3_STRETCH_TOKENS * len(stretches):
        return None
    return tuple((slot, start, stop) for slot, start, stop in stretches)


def _lora_rows(
    token_slots: list[int],
    rank_of: dict[int, int],
    device: str,
    static_slots: torch.Tensor | None,
    modules: frozenset[str] | None = None,
) -> LoraRows | None:
    # The LoRA tokens by rank, then slot: the tokens of one adapter form one stretch, so its tables
    # are read once however its rows are spread over the batch, and those of one rank lie together,
    # so each rank is multiplied at its own width.
    tokens = sorted(
        (index for index, slot in enumerate(token_slots) if rank_of[slot]),
        key=lambda index: (rank_of[token_slots[index]], token_slots[index]),
    )
    if not tokens:
        return None
    rank = max(rank_of.values())
    if static_slots is not None:  # a captured graph: every row, at the widest rank it was captured at
        pieces = ((rank, 0, static_slots.shape[0], static_slots),)
        return LoraRows(rank, None, static_slots, None, pieces, None)
    slots = [token_slots[index] for index in tokens]
    runs = _stretches(slots, lambda slot: True)  # over the LoRA tokens, one per adapter
    every = tokens == list(range(len(token_slots)))
    equal = len({stop - start for _, start, stop in runs}) == 1
    # In the forward: each run is a stretch of consecutive tokens there, and the LoRA tokens are not
    # simply every token in order; the products can then read and add the forward's rows in place.
    in_forward = not every and all(
        tokens[stop - 1] - tokens[start] == stop - 1 - start for _, start, stop in runs
    )
    # Each block costs a GEMM per projection, a dispatch of a few µs; gathering the tables instead
    # copies them, which costs about as much as reading them twice. Measured with tables of 32 layers
    # at rank 16: blocks win up to about one per four adapters, and in the forward up to four.
    long = not equal and len(slots) > 2 * len(runs)  # long stretches of several lengths: in place
    by_position = _blocks(runs, rank_of, equal, tokens)
    by_slot = _blocks(runs, rank_of, equal)
    blocks: list[tuple[int, int, int, int, int]] | None = None
    starts: tuple[int, ...] | None = None
    pieces: list[tuple[int, int, int, torch.Tensor]] | None = None
    if in_forward and (long or len(by_position) <= max(4, len(runs) // 4)):
        blocks, starts = by_position, tuple(tokens[block[2]] for block in by_position)
    elif long or len(by_slot) <= max(1, len(runs) // 4):
        blocks = by_slot
    else:  # one batched GEMM per rank over gathered tables: one per stretch, or per token for short ones
        pieces = _pieces(
            runs if equal else [[slot, i, i + 1] for i, slot in enumerate(slots)], rank_of, device
        )
    return LoraRows(
        rank=rank,
        tokens=None if every else torch.tensor(tokens, device=device),
        token_slots=torch.tensor(slots, device=device),
        single=slots[0] if len(runs) == 1 else None,
        pieces=None if pieces is None else tuple(pieces),
        blocks=None if blocks is None else tuple(blocks),
        modules=modules,
        starts=starts,
    )


def _blocks(
    runs: list[list[int]], rank_of: dict[int, int], join: bool, tokens: list[int] | None = None
) -> list[tuple[int, int, int, int, int]]:
    """The runs as blocks (first slot, slots, start, stop, rank): with ``join`` (runs of one length),
    a run joins the block before it when its slot follows that block's last and its adapter has the
    block's rank, and, given the LoRA tokens' places in the forward (``tokens``), when its first token
    follows that block's last there too."""
    blocks: list[tuple[int, int, int, int, int]] = []
    for slot, start, stop in runs:
        rank = rank_of[slot]
        follows = blocks and blocks[-1][0] + blocks[-1][1] == slot and blocks[-1][4] == rank
        if join and follows and (tokens is None or tokens[start] == tokens[start - 1] + 1):
            first, count, begin, _, _ = blocks[-1]
            blocks[-1] = (first, count + 1, begin, stop, rank)
        else:
            blocks.append((slot, 1, start, stop, rank))
    return blocks


def _pieces(
    pieces: list[list[int]], rank_of: dict[int, int], device: str
) -> list[tuple[int, int, int, torch.Tensor]]:
    """The pieces [slot, start, stop] of one length, in rank order, as (rank, start, stop, slots): the
    pieces of each rank, one batched GEMM over their gathered tables."""
    groups = []
    for rank, group in groupby(pieces, key=lambda piece: rank_of[piece[0]]):
        laid = list(group)
        slots = torch.tensor([slot for slot, _, _ in laid], device=device)
        groups.append((rank, laid[0][1], laid[-1][2], slots))
    return groups


@dataclass(frozen=True)
class RowInput:
    """One row's part of a forward: ``token_ids`` written at cache positions ``cache_start``...

    ``virtual``: how many of the first tokens are the slot's virtual tokens (their ids are ignored;
    only the forward that computes a prompt adapter's K/V when it loads has them);
    ``prefix``: how many prefix K/V entries are copied into the row's cache ahead of its tokens;
    ``picks``: which of its tokens (indices into ``token_ids``) the forward returns logits for.
    """

    row: int
    slot: int
    token_ids: list[int]
    cache_start: int
    rope_start: int
    picks: tuple[int, ...]
    virtual: int = 0
    prefix: int = 0


@dataclass(frozen=True)
class AttentionGroup:
    """Some rows' queries laid side by side: a (size × length) grid of cache rows ``rows``.

    ``tokens``: the flat indices of the group's tokens (None: every token of the forward, in grid
    order); ``grid``: each of those tokens' place in the flattened grid (None: the grid is exactly
    those tokens, with no padding). ``query_pos``: (size, length) cache position of every grid query,
    0 for padding, which then sees one key and is dropped.
    """

    rows: slice | torch.Tensor
    size: int
    length: int
    tokens: torch.Tensor | None
    grid: torch.Tensor | None
    query_pos: torch.Tensor
    kv_len: int

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        """(tokens, heads, head dim) of the forward -> (size, heads, length, head dim) of the grid."""
        mine = q if self.tokens is None else q.index_select(0, self.tokens)
        if self.grid is not None:
            laid = mine.new_zeros(self.size * self.length, *mine.shape[1:])
            mine = laid.index_copy_(0, self.grid, mine)
        return mine.view(self.size, self.length, *q.shape[1:]).transpose(1, 2)

    def outputs(self, out: torch.Tensor) -> torch.Tensor:
        """(size, heads, length, head dim) of the grid -> (the group's tokens, heads · head dim)."""
        flat = out.transpose(1, 2).reshape(self.size * self.length, -1)
        return flat if self.grid is None else flat.index_select(0, self.grid)


@dataclass(frozen=True)
class Batch:
    """Everything one forward needs: flat per-token inputs, attention groups, logits picks."""

    token_ids: torch.Tensor  # (tokens,)
    token_rows: torch.Tensor  # (tokens,) cache row of each token, for K/V writes
    cache_pos: torch.Tensor  # (tokens,)
    rope_pos: torch.Tensor  # (1, tokens)
    groups: tuple[AttentionGroup, ...]
    adapters: AdapterRows  # of every token
    picks: torch.Tensor | None  # (picked,) flat indices of the tokens whose logits are returned; None: all
    pick_adapters: AdapterRows  # of the picked tokens (the output head's adapters)
    virtual: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # token, slot, index
    # (cache row, slot, count): the slot's first ``count`` prefix K/V entries go to the row's first
    # ``count`` positions. Copied as slices: 0.04 ms a row on the 360M shape, against 0.44 by advanced
    # indexing.
    prefix_write: tuple[tuple[int, int, int], ...] = ()


def pack(inputs: list[RowInput], features: list[SlotFeatures], device: str) -> Batch:
    """One forward over ``inputs`` (rows in any order, each with at least one token)."""
    token_ids: list[int] = []
    token_rows: list[int] = []
    cache_pos: list[int] = []
    rope_pos: list[int] = []
    token_slots: list[int] = []
    picks: list[int] = []
    virtual: list[list[int]] = [[], [], []]
    starts = []
    for row in inputs:
        start = len(token_ids)
        starts.append(start)
        count = len(row.token_ids)
        token_ids += row.token_ids
        token_rows += [row.row] * count
        cache_pos += range(row.cache_start, row.cache_start + count)
        rope_pos += range(row.rope_start, row.rope_start + count)
        token_slots += [row.slot] * count
        picks += [start + pick for pick in row.picks]
        for t in range(row.virtual):
            for column, value in zip(virtual, (start + t, row.slot, t), strict=True):
                column.append(value)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device)

    decoding = [index for index, row in enumerate(inputs) if len(row.token_ids) == 1]
    prefilling = [index for index, row in enumerate(inputs) if len(row.token_ids) > 1]
    groups = tuple(
        _group([inputs[i] for i in members], [starts[i] for i in members], len(token_ids), device)
        for members in (decoding, prefilling)
        if members
    )
    adapters = adapter_rows(token_slots, features, device)
    every = picks == list(range(len(token_ids)))  # a decode step: each row's one token
    return Batch(
        token_ids=tensor(token_ids),
        token_rows=tensor(token_rows),
        cache_pos=tensor(cache_pos),
        rope_pos=tensor(rope_pos).unsqueeze(0),
        groups=groups,
        adapters=adapters,
        picks=None if every else tensor(picks),
        pick_adapters=adapters if every else adapter_rows([token_slots[p] for p in picks], features, device),
        virtual=tuple(tensor(c) for c in virtual) if virtual[0] else None,
        prefix_write=tuple((row.row, row.slot, row.prefix) for row in inputs if row.prefix),
    )


def _group(inputs: list[RowInput], starts: list[int], total: int, device: str) -> AttentionGroup:
    """The grid of some rows. It spans cache rows 0..highest (a view of the cache) unless that is
    over twice as many rows as it holds: then only its own rows are copied out of the cache, since
    a copy reads and writes each row once more than attention over an empty row reads it."""
    length = max(len(row.token_ids) for row in inputs)
    highest = max(row.row for row in inputs)
    spans = highest + 1 <= 2 * len(inputs)
    grid_rows = list(range(highest + 1)) if spans else sorted(row.row for row in inputs)
    place = {row: index for index, row in enumerate(grid_rows)}
    query_pos = [[0] * length for _ in grid_rows]
    tokens, grid = [], []
    for row, start in zip(inputs, starts, strict=True):
        for t in range(len(row.token_ids)):
            tokens.append(start + t)
            grid.append(place[row.row] * length + t)
            query_pos[place[row.row]][t] = row.cache_start + t
    kv_len = max(row.cache_start + len(row.token_ids) for row in inputs)
    contiguous = tokens == list(range(total))
    return AttentionGroup(
        rows=slice(0, highest + 1) if spans else torch.tensor(grid_rows, device=device),
        size=len(grid_rows),
        length=length,
        tokens=None if contiguous else torch.tensor(tokens, device=device),
        grid=None if grid == list(range(len(grid_rows) * length)) else torch.tensor(grid, device=device),
        query_pos=torch.tensor(query_pos, device=device),
        kv_len=kv_len,
    )
