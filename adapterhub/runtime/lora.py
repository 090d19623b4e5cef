"""LoRA for a forward whose tokens belong to rows naming different adapters: each token uses only
its own adapter's A and B.

Every slot's A and B live in preallocated tables. For one forward, the tokens that have a LoRA are
multiplied by their own slot's tables only, so the work is ``Σ tokens × rank``: it does not grow with
the number of resident slots, and tokens without a LoRA cost nothing. How (``LoraRows.multiply``):
when every LoRA token names one adapter, its tables are used in place. Otherwise the tokens are cut
into *blocks*: adapters in consecutive slots whose stretches have one length (decoding rows, prompts
of one length) form one block and multiply by their slots' tables in place, as one batched GEMM over
a view of the tables (the BGMV idea with no gather); a stretch of its own is one GEMM. When a forward
would take too many blocks, its equal stretches gather a table each into one batched GEMM instead.
Where some tokens have no LoRA and each block's tokens are consecutive in the forward, each block
reads and adds the forward's own rows in place (the SGMV idea), with no gather or scatter.

Projections that read the same input (q/k/v, gate/up) share one A table, so one shrink GEMM serves
the whole group; each member has its own B. A projection that no adapter of the forward targets
(``LoraRows.modules``) is skipped, and so is a group none of whose members is targeted: adapters on
``q_proj,v_proj`` only pay for q and v.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    laid_x, laid_out = _batched(x, count), out.view(count, -1, out.shape[-1])
    if accumulate:
        laid_out.baddbmm_(laid_x, tables.tensor[slot : slot + count])
    else:
        torch.bmm(laid_x, tables.tensor[slot : slot + count], out=laid_out)


@dataclass(frozen=True)
class LoraRows:
    """Which tokens of a forward have a LoRA, and how their products are computed.

    ``tokens``: the flat indices of the LoRA tokens, or None when every token has one;
    ``token_slots``: the slot of each LoRA token; ``single``: the one slot every LoRA token names, if
    they all do; ``pieces``: the slot of each equal-length piece for one batched GEMM over gathered
    tables, when the forward takes that way; otherwise ``blocks``: (first slot, slots, start, stop)
    over the LoRA tokens, each of the ``slots`` consecutive slots owning an equal stretch of
    ``start:stop``, multiplied by a view of their tables; ``modules``: the modules the tokens'
    adapters target, None for every one (a captured graph); ``starts``: where each block begins among
    the forward's tokens, when some tokens have no LoRA and every block is one stretch of
    consecutive tokens there (a decoding row, a prompt). The products then read and add the
    forward's rows in place, with no gather of the LoRA tokens and no scatter back.

    Timed with tables of 32 layers: in place, the families bench's batch (two adapters, a row each,
    beside six other rows) takes 6 % less LoRA time in a decode step and 21 % less in the prefill;
    64 decoding rows of adapters in 64 consecutive slots take half the time of gathering their tables.
    """

    rank: int  # the widest rank among the tokens' adapters
    tokens: torch.Tensor | None
    token_slots: torch.Tensor
    single: int | None
    pieces: torch.Tensor | None
    blocks: tuple[tuple[int, int, int, int], ...] | None
    modules: frozenset[str] | None = None
    starts: tuple[int, ...] | None = None

    def targets(self, names: frozenset[str]) -> bool:
        """Whether an adapter of the forward targets any of the modules ``names``."""
        return self.modules is None or not self.modules.isdisjoint(names)

    def multiply(self, x: torch.Tensor, tables: SlotTables) -> torch.Tensor:
        """Each LoRA token's row of ``x`` (LoRA tokens, k) times its own slot's (k, n) of ``tables``."""
        if self.single is not None:
            return x @ tables.slot(self.single)
        if self.pieces is not None:
            gathered = tables.tensor.index_select(0, self.pieces)  # a third of advanced indexing's time
            product = torch.bmm(_batched(x, self.pieces.shape[0]), gathered)
            return product.view(x.shape[0], -1)
        product = x.new_empty(x.shape[0], tables.tensor.shape[-1])
        for slot, count, start, stop in self.blocks:
            _multiply_block(x[start:stop], tables, slot, count, product[start:stop], accumulate=False)
        return product

    def multiply_tokens(self, x: torch.Tensor, tables: SlotTables) -> torch.Tensor:
        """``multiply`` of the LoRA tokens' rows of the forward's ``x`` (tokens, k)."""
        if self.starts is not None:
            product = x.new_empty(self.blocks[-1][3], tables.tensor.shape[-1])
            for (slot, count, start, stop), first in zip(self.blocks, self.starts, strict=True):
                rows = x[first : first + stop - start]
                _multiply_block(rows, tables, slot, count, product[start:stop], accumulate=False)
            return product
        return self.multiply(x if self.tokens is None else x.index_select(0, self.tokens), tables)

    def add_product(self, x: torch.Tensor, tables: SlotTables, out: torch.Tensor) -> torch.Tensor:
        """Add ``multiply(x, tables)`` to the LoRA tokens' rows of ``out`` (tokens, n), in place.

        Where every token has a LoRA, or each block is a stretch of the forward (``starts``), the
        GEMMs accumulate into ``out`` themselves (``addmm_``, ``baddbmm_``): one op per product
        instead of a GEMM, a temporary and an add.
        """
        if self.starts is not None and out.dtype == tables.tensor.dtype:
            for (slot, count, start, stop), first in zip(self.blocks, self.starts, strict=True):
                rows = out[first : first + stop - start]
                _multiply_block(x[start:stop], tables, slot, count, rows, accumulate=True)
            return out
        if self.tokens is not None or out.dtype != tables.tensor.dtype:
            delta = self.multiply(x, tables).to(out.dtype)
            return out.add_(delta) if self.tokens is None else out.index_add_(0, self.tokens, delta)
        if self.pieces is not None:
            count = self.pieces.shape[0]
            laid = out.view(count, -1, out.shape[-1])
            laid.baddbmm_(_batched(x, count), tables.tensor.index_select(0, self.pieces))
            return out
        for slot, count, start, stop in self.blocks:
            _multiply_block(x[start:stop], tables, slot, count, out[start:stop], accumulate=True)
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
            shrunk = lora.multiply_tokens(x, self.a_at(lora.rank))
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
        return lora.add_product(shrunk[member], self.b_at(member, lora.rank), out)
