"""LoRA for a forward whose tokens belong to rows naming different adapters: each token uses only
its own adapter's A and B.

Every slot's A and B live in preallocated tables. For one forward, the tokens that have a LoRA are
multiplied by their own slot's tables only, so the work is ``Σ tokens × rank``: it does not grow with
the number of resident slots, and tokens without a LoRA cost nothing. How (``LoraRows.multiply``):
when every LoRA token names one adapter, its tables are used in place; stretches of equal length
(decoding rows, prompts of one length) gather one table per stretch into a batched GEMM — the BGMV
idea in plain PyTorch; prompts of several lengths multiply stretch by stretch, in place.

Projections that read the same input (q/k/v, gate/up) share one A table, so one shrink GEMM serves
the whole group; each member has its own B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraRows:
    """Which tokens of a forward have a LoRA, and how their products are computed.

    ``tokens``: the flat indices of the LoRA tokens, or None when every token has one;
    ``token_slots``: the slot of each LoRA token; ``runs``: (slot, start, stop) stretches of one
    slot over the LoRA tokens; ``single``: the one slot every LoRA token names, if they all do;
    ``pieces``: the slot of each equal-length piece for one batched GEMM, when there is one.
    """

    rank: int  # the widest rank among the tokens' adapters
    tokens: torch.Tensor | None
    token_slots: torch.Tensor
    single: int | None
    pieces: torch.Tensor | None
    runs: tuple[tuple[int, int, int], ...] | None

    def multiply(self, x: torch.Tensor, tables: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Each LoRA token's row of ``x`` (tokens, k) times its own slot's (k, n) of ``tables``, or
        of ``tables`` transposed when it holds (n, k) per slot (gathered first, then transposed)."""

        def table(slot: int) -> torch.Tensor:
            return tables[slot].t() if transposed else tables[slot]

        if self.single is not None:
            return x @ table(self.single)
        if self.pieces is not None:
            gathered = tables[self.pieces]
            pieces = x.reshape(self.pieces.shape[0], -1, x.shape[-1])
            product = torch.bmm(pieces, gathered.transpose(1, 2) if transposed else gathered)
            return product.view(x.shape[0], -1)
        return torch.cat([x[start:stop] @ table(slot) for slot, start, stop in self.runs])


class LoraGroup:
    """Every slot's LoRA for the projections of one group: a shared A, one B per member.

    ``a``: (slots, max rank, members, in); ``b[m]``: (slots, max rank, out of member m), already
    multiplied by the adapter's scaling. Rank-major rows make ``[:, :r]`` cover every member up to
    rank ``r`` in one contiguous block per slot. A group few adapters use (the output head, whose B is
    vocabulary-wide) is allocated when the first of them loads.
    """

    def __init__(
        self,
        in_features: int,
        out_features: list[int],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: str,
        *,
        allocate: bool = True,
    ) -> None:
        self.members = len(out_features)
        self.in_features, self.out_features = in_features, out_features
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.a: torch.Tensor | None = None
        self.b: list[torch.Tensor] = []
        if allocate:
            self.allocate()

    def allocate(self) -> None:
        if self.a is None:
            shape = (self.num_slots, self.max_rank, self.members, self.in_features)
            self.a = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.b = [
                torch.zeros(self.num_slots, self.max_rank, out, dtype=self.dtype, device=self.device)
                for out in self.out_features
            ]

    def slot_views(self, slot: int, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s (max rank × in) A rows and (max rank × out) B rows of one member."""
        self.allocate()
        return self.a[slot, :, member], self.b[member][slot]

    def shrink(self, x: torch.Tensor, lora: LoraRows | None) -> torch.Tensor | None:
        """``x Aᵀ`` of each LoRA token of ``x`` (tokens, in): (LoRA tokens, rank × members), rank-major."""
        if lora is None or self.a is None:
            return None
        if x.dtype != self.a.dtype:
            x = x.to(self.a.dtype)
        if lora.tokens is not None:
            x = x.index_select(0, lora.tokens)
        return lora.multiply(x, self.a[:, : lora.rank].flatten(1, 2), transposed=True)

    def expand(self, member: int, shrunk: torch.Tensor, lora: LoraRows, out: torch.Tensor) -> torch.Tensor:
        """Add each LoRA token's ``(x Aᵀ) B`` for one member to ``out`` (tokens, out), in place: it is
        the caller's own temporary, the base projection's output."""
        mine = shrunk.view(shrunk.shape[0], lora.rank, self.members)[..., member]
        delta = lora.multiply(mine, self.b[member][:, : lora.rank]).to(out.dtype)
        return out.add_(delta) if lora.tokens is None else out.index_add_(0, lora.tokens, delta)
