"""LoRA for a forward whose tokens belong to rows naming different adapters: each token uses only
its own adapter's A and B.

Every slot's A and B live in preallocated tables. For one forward, the tokens that have a LoRA are
multiplied by their own slot's tables only, at their own adapter's rank, so the work is
``Σ tokens × own rank``: it does not grow with the number of resident slots or with the widest rank
beside them, and tokens without a LoRA cost nothing. How (``LoraRows.multiply``): when every LoRA
token names one adapter, its tables are used in place. Otherwise the tokens are cut into *blocks*:
adapters of one rank in consecutive slots whose stretches have one length (decoding rows, prompts of
one length) form one block and multiply by their slots' tables in place, as one batched GEMM over a
view of the tables (the BGMV idea with no gather); a stretch of its own is one GEMM. When a forward
would take too many blocks, its equal stretches gather a table each into one batched GEMM per rank
instead. Where some tokens have no LoRA and each block's tokens are consecutive in the forward, each
block reads and adds the forward's own rows in place (the SGMV idea), with no gather or scatter.

Projections that read the same input (q/k/v, gate/up) share one A table, so one shrink GEMM serves
the whole group; each member has its own B. A projection that no adapter of the forward targets
(``LoraRows.modules``) is skipped, and so is a group none of whose members is targeted: adapters on
``q_proj,v_proj`` only pay for q and v.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch


def _batched(x: torch.Tensor, count: int) -> torch.Tensor:
    """``x`` (tokens, k) as ``count`` matrices of its rows, each with unit column stride: a batched
    GEMM on matrices with strided columns runs one GEMM per matrix on the CPU (measured: the B half
    of 64 decoding rows' LoRA took 1.5 times as long). A shrink's members are laid so already; their
    rows stay strided, as a GEMM's leading dimension allows."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.view(count, -1, x.shape[-1])


class SlotTables:
    """Every slot's (k, n) matrix of one table, ``tensor`` (slots, k, n), with each slot's own view
    made once: a decode step multiplies by them in every layer, and each view made anew is a dispatch
    of about 1 µs beside GEMMs of a few µs."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self._slot: dict[int, torch.Tensor] = {}

    def slot(self, slot: int) -> torch.Tensor:
        view = self._slot.get(slot)
        if view is None:
            view = self._slot[slot] = self.tensor[slot]
        return view


# A table of every slot cut at a rank: the A tables' columns or the B tables' rows up to it.
TablesAt = Callable[[int], SlotTables]


def _part(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``t``; ``t`` itself when they are all of it (a slice is a dispatch)."""
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


def _multiply_block(
    x: torch.Tensor, tables: SlotTables, slot: int, count: int, out: torch.Tensor, accumulate: bool
) -> None:
    """``x`` (tokens, k), an equal stretch for each of ``count`` slots from ``slot``, times their
    (k, n) tables, written or (``accumulate``) added to ``out`` (tokens, n)."""
    if count == 1:  # one GEMM: a batched one of one matrix takes longer on the CPU
        if accumulate:
            out.addmm_(x, tables.slot(slot))
        else:
            torch.mm(x, tables.slot(slot), out=out)
        return
    _multiply_laid(x, tables.tensor[slot : slot + count], out, accumulate)


def _multiply_laid(x: torch.Tensor, tables: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """``x`` (tokens, k), an equal piece for each of the (pieces, k, n) ``tables``, times its own,
    written or (``accumulate``) added to ``out`` (tokens, n)."""
    count = tables.shape[0]
    laid_x, laid_out = _batched(x, count), out.view(count, -1, out.shape[-1])
    if accumulate:
        laid_out.baddbmm_(laid_x, tables)
    else:
        torch.bmm(laid_x, tables, out=laid_out)


@dataclass(frozen=True)
class LoraRows:
    """Which tokens of a forward have a LoRA, and how their products are computed.

    ``tokens``: the flat indices of the LoRA tokens, or None when every token has one;
    ``token_slots``: the slot of each LoRA token; ``single``: the one slot every LoRA token names, if
    they all do; ``pieces``: (rank, start, stop, slots) over the LoRA tokens for each rank among them,
    when the forward gathers tables: ``start:stop`` is one equal-length piece per slot of ``slots``,
    multiplied by its gathered table in one batched GEMM; otherwise ``blocks``: (first slot, slots,
    start, stop, rank) over the LoRA tokens, each of the ``slots`` consecutive slots (adapters of one
    rank) owning an equal stretch of ``start:stop``, multiplied by a view of their tables; ``modules``:
    the modules the tokens' adapters target, None for every one (a captured graph); ``starts``: where
    each block begins among the forward's tokens, when some tokens have no LoRA and every block is one
    stretch of consecutive tokens there (a decoding row, a prompt). The products then read and add the
    forward's rows in place, with no gather of the LoRA tokens and no scatter back.

    Every block and piece multiplies at its own adapters' rank, so a rank-1 row beside a rank-64 row
    costs rank 1; only a captured graph's one piece runs every row at the widest rank.

    Timed with tables of 32 layers: in place, the families bench's batch (two adapters, a row each,
    beside six other rows) takes 6 % less LoRA time in a decode step and 21 % less in the prefill;
    64 decoding rows of adapters in 64 consecutive slots take half the time of gathering their tables.
    """

    rank: int  # the widest rank among the tokens' adapters: the width of a shrink's product
    tokens: torch.Tensor | None
    token_slots: torch.Tensor
    single: int | None
    pieces: tuple[tuple[int, int, int, torch.Tensor], ...] | None
    blocks: tuple[tuple[int, int, int, int, int], ...] | None
    modules: frozenset[str] | None = None
    starts: tuple[int, ...] | None = None

    def targets(self, names: frozenset[str]) -> bool:
        """Whether an adapter of the forward targets any of the modules ``names``."""
        return self.modules is None or not self.modules.isdisjoint(names)

    def _at_rank(
        self, rank: int, x: torch.Tensor, out: torch.Tensor, tables: SlotTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and ``out`` cut to the columns that ``tables`` (slots, k, n) at ``rank`` reads and
        writes, for a block below the forward's widest rank: an expand's input to its rank k, a
        shrink's product to its n of the widest rank's columns."""
        if rank == self.rank:  # the tensors are as wide as the widest rank's tables
            return x, out
        k, n = tables.tensor.shape[-2:]
        return (x if x.shape[-1] == k else x[:, :k]), (out if out.shape[-1] == n else out[:, :n])

    def multiply(self, x: torch.Tensor, tables_at: TablesAt) -> torch.Tensor:
        """Each LoRA token's row of ``x`` (LoRA tokens, k) times its own slot's (k, n) table."""
        widest = tables_at(self.rank)
        if self.single is not None:
            return x @ widest.slot(self.single)
        product = x.new_empty(x.shape[0], widest.tensor.shape[-1])
        self._multiply_into(x, tables_at, product, accumulate=False)
        return product

    def _multiply_into(
        self, x: torch.Tensor, tables_at: TablesAt, out: torch.Tensor, accumulate: bool
    ) -> None:
        """Each LoRA token's row of ``x`` times its own table, written or (``accumulate``) added to
        the same row of ``out``: both hold the LoRA tokens' rows, in their order."""
        if self.pieces is not None:
            for rank, start, stop, slots in self.pieces:
                tables = tables_at(rank)
                rows, rows_out = self._at_rank(rank, _part(x, start, stop), _part(out, start, stop), tables)
                # index_select: a third of advanced indexing's time
                _multiply_laid(rows, tables.tensor.index_select(0, slots), rows_out, accumulate)
            return
        for slot, count, start, stop, rank in self.blocks:
            tables = tables_at(rank)
            rows, rows_out = self._at_rank(rank, x[start:stop], out[start:stop], tables)
            _multiply_block(rows, tables, slot, count, rows_out, accumulate)

    def multiply_tokens(self, x: torch.Tensor, tables_at: TablesAt) -> torch.Tensor:
        """``multiply`` of the LoRA tokens' rows of the forward's ``x`` (tokens, k)."""
        if self.starts is not None:
            product = x.new_empty(self.blocks[-1][3], tables_at(self.rank).tensor.shape[-1])
            for (slot, count, start, stop, rank), first in zip(self.blocks, self.starts, strict=True):
                tables = tables_at(rank)
                rows, out = self._at_rank(rank, x[first : first + stop - start], product[start:stop], tables)
                _multiply_block(rows, tables, slot, count, out, accumulate=False)
            return product
        return self.multiply(x if self.tokens is None else x.index_select(0, self.tokens), tables_at)

    def add_product(self, x: torch.Tensor, tables_at: TablesAt, out: torch.Tensor) -> torch.Tensor:
        """Add ``multiply(x, tables_at)`` to the LoRA tokens' rows of ``out`` (tokens, n), in place.

        Where every token has a LoRA, or each block is a stretch of the forward (``starts``), the
        GEMMs accumulate into ``out`` themselves (``addmm_``, ``baddbmm_``): one op per product
        instead of a GEMM, a temporary and an add.
        """
        same_dtype = out.dtype == tables_at(self.rank).tensor.dtype
        if self.starts is not None and same_dtype:
            for (slot, count, start, stop, rank), first in zip(self.blocks, self.starts, strict=True):
                tables = tables_at(rank)
                rows, rows_out = self._at_rank(rank, x[start:stop], out[first : first + stop - start], tables)
                _multiply_block(rows, tables, slot, count, rows_out, accumulate=True)
            return out
        if self.tokens is not None or not same_dtype:
            delta = self.multiply(x, tables_at).to(out.dtype)
            return out.add_(delta) if self.tokens is None else out.index_add_(0, self.tokens, delta)
        self._multiply_into(x, tables_at, out, accumulate=True)
        return out


class LoraGroup:
    """Every slot's LoRA for the projections of one group: a shared A, one B per member.

    ``names``: the members' qualified module names; ``a``: (slots, in, max rank, members), Aᵀ stored
    rank-major; ``b[m]``: (slots, max rank, out of member m), already multiplied by the adapter's
    scaling. Rank-major columns make ``[..., :r·members]`` cover every member up to rank ``r``, and
    holding Aᵀ lets the shrink multiply without a transposed operand (measured: 12.7 µs instead of
    16 for 8 tokens at rank 16 on q/k/v). A group few adapters use (the output head, whose B is
    vocabulary-wide) is allocated when the first of them loads.
    """

    def __init__(
        self,
        names: list[str],
        in_features: int,
        out_features: list[int],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        *,
        allocate: bool = True,
    ) -> None:
        self.names = names
        self.members = len(out_features)
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.a: torch.Tensor | None = None
        self.b: list[torch.Tensor] = []
        # Views of the tables cut at a forward's rank, made once: a decode step reads them in every
        # layer, and each slice made anew is a dispatch of about 1 µs beside GEMMs of 4 to 10 µs.
        self._a_at: dict[int, SlotTables] = {}
        self._b_at: dict[tuple[int, int], SlotTables] = {}
        self._one: dict[tuple[int, int], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self._any_member = frozenset(names)
        self._member = [frozenset((name,)) for name in names]
        self._b_of = [partial(self.b_at, member) for member in range(self.members)]
        if allocate:
            self.allocate()

    def allocate(self) -> None:
        if self.a is None:
            shape = (self.num_slots, self.in_features, self.max_rank, self.members)
            self.a = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.b = [
                torch.zeros(self.num_slots, self.max_rank, out, dtype=self.dtype, device=self.device)
                for out in self.out_features
            ]

    def slot_views(self, slot: int, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s (max rank × in) A rows and (max rank × out) B rows of one member."""
        self.allocate()
        return self.a[slot, :, :, member].t(), self.b[member][slot]

    def a_at(self, rank: int) -> SlotTables:
        """Every slot's Aᵀ columns up to ``rank`` for all members: (slots, in, rank × members)."""
        if rank not in self._a_at:
            self._a_at[rank] = SlotTables(self.a.flatten(2)[..., : rank * self.members])
        return self._a_at[rank]

    def b_at(self, member: int, rank: int) -> SlotTables:
        """Every slot's B rows up to ``rank`` of one member: (slots, rank, out)."""
        key = (member, rank)
        if key not in self._b_at:
            self._b_at[key] = SlotTables(self.b[member][:, :rank])
        return self._b_at[key]

    def one_slot(self, rank: int, slot: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One slot's Aᵀ (in, rank × members) and each member's B (rank, out), cut at ``rank``.

        The commonest forward has one adapter on every token; it multiplies by these views directly,
        made once. Measured with tables of 32 layers at 8 decoding tokens: 11 to 13 % less LoRA time
        than indexing the slot out of every slot's tables in each call and testing each member's
        target in turn."""
        key = (rank, slot)
        if key not in self._one:
            self._one[key] = (
                self.a_at(rank).slot(slot),
                tuple(self.b_at(member, rank).slot(slot) for member in range(self.members)),
            )
        return self._one[key]

    def shrink(self, x: torch.Tensor, lora: LoraRows | None) -> tuple[torch.Tensor, ...] | None:
        """``x Aᵀ`` of each LoRA token of ``x`` (tokens, in), one (LoRA tokens, rank) view per member."""
        if lora is None or self.a is None:
            return None
        if not lora.targets(self._any_member):
            return None
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if lora.single is not None and lora.tokens is None:
            shrunk = x @ self.one_slot(lora.rank, lora.single)[0]
        else:
            shrunk = lora.multiply_tokens(x, self.a_at)
        if self.members == 1:
            return (shrunk,)
        # Members laid side by side: a member's columns of the rank-major product are strided, and
        # each GEMM of the expand would copy them first (one copy here instead of one per member).
        laid = shrunk.view(shrunk.shape[0], lora.rank, self.members).transpose(1, 2).contiguous()
        return laid.unbind(1)

    def expand(
        self, member: int, shrunk: tuple[torch.Tensor, ...], lora: LoraRows, out: torch.Tensor
    ) -> torch.Tensor:
        """Add each LoRA token's ``(x Aᵀ) B`` for one member to ``out`` (tokens, out), in place: it is
        the caller's own temporary, the base projection's output."""
        if not lora.targets(self._member[member]):
            return out
        if lora.single is not None and lora.tokens is None and out.dtype == self.dtype:
            return out.addmm_(shrunk[member], self.one_slot(lora.rank, lora.single)[1][member])
        return lora.add_product(shrunk[member], self._b_of[member], out)
