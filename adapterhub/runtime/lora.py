"""LoRA for a batch whose rows name different adapters: each row uses only its own adapter's A and B.

Every slot's A and B live in preallocated tables. For one forward, the rows that have a LoRA gather
their own adapter's rows of the tables (up to the widest rank among them) and multiply in one batched
GEMM per table — the BGMV idea in plain PyTorch. The work is ``Σ rows × rank``: it does not grow with
the number of resident slots, and rows without a LoRA cost nothing. When every LoRA row names one
adapter, its table rows are used in place, with no gather at all.

Projections that read the same input (q/k/v, gate/up) share one A table, so one shrink GEMM serves
the whole group; each member has its own B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LoraRows:
    """Which rows of a forward have a LoRA, and how to reach their table rows.

    ``slots``: the slot of each LoRA row; ``rows``: their batch rows, or None when every row has one;
    ``single``: the one slot every LoRA row names, when they all name the same one (no gather needed).
    """

    rank: int  # the widest rank among the rows' adapters
    slots: torch.Tensor
    rows: torch.Tensor | None
    single: int | None


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
        """``x Aᵀ`` of each LoRA row: (LoRA rows, tokens, rank × members), columns rank-major."""
        if lora is None or self.a is None:
            return None
        rank, width = lora.rank, lora.rank * self.members
        if x.dtype != self.a.dtype:
            x = x.to(self.a.dtype)
        if lora.rows is not None:
            x = x.index_select(0, lora.rows)
        if lora.single is not None:
            return F.linear(x, self.a[lora.single, :rank].reshape(width, self.in_features))
        a = self.a[:, :rank][lora.slots].reshape(-1, width, self.in_features)
        return torch.bmm(x.reshape(a.shape[0], -1, self.in_features), a.transpose(1, 2))

    def expand(self, member: int, shrunk: torch.Tensor, lora: LoraRows, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus each LoRA row's ``(x Aᵀ) B`` for one member."""
        rows, rank = shrunk.shape[0], lora.rank
        mine = shrunk.view(rows, -1, rank, self.members)[..., member]
        table = self.b[member]
        if lora.single is not None:
            delta = mine @ table[lora.single, :rank]
        else:
            delta = torch.bmm(mine, table[:, :rank][lora.slots])
        delta = delta.to(out.dtype)
        if lora.rows is None:
            return out + delta.view(out.shape)
        return out.index_add(0, lora.rows, delta.view(rows, *out.shape[1:]))
