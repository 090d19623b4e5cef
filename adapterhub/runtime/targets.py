"""The base modules adapters change, each wrapped with every slot's tables for it.

- ``SlotLinear``: a projection (or the output head) with per-slot LoRA (``runtime/lora.py``), IA3
  input/output scales, DoRA's output-side scale and an additive output bias (LoRA's ``lora_bias``,
  and the biases that ``bias="all"``/``"lora_only"`` adapters replace).
- ``SlotEmbedding``: the input embedding with per-slot LoRA (``B A[ids]``) and PEFT's trainable
  tokens (rows of the embedding, and of a tied output head, that an adapter replaces).

Per-slot vectors of every projection share one ``(slots × Σ widths)`` table per kind; each projection
gathers its own columns for the forward's tokens (``RowVectors``). Tables that few adapters need
(DoRA, biases, embedding LoRA, trainable tokens) are allocated on first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.runtime.lora import LoraGroup, LoraRows, SlotTables


class VectorTable:
    """One per-slot vector per (module, side), all in a single ``(slots × Σ widths)`` tensor."""

    def __init__(self, fill: float) -> None:
        self.fill = fill
        self.width = 0
        self.tensor: torch.Tensor | None = None

    def columns(self, width: int) -> slice:
        """Reserve ``width`` columns (before the table is allocated)."""
        start, self.width = self.width, self.width + width
        return slice(start, self.width)

    def allocate(self, num_slots: int, dtype: torch.dtype, device: str) -> None:
        if self.tensor is None:
            self.tensor = torch.full((num_slots, self.width), self.fill, dtype=dtype, device=device)


@dataclass(frozen=True)
class RowVectors:
    """The per-slot vector tables one forward reads, for tokens of rows serving ``slots``; a table is
    None where no token of the forward uses that kind."""

    slots: torch.Tensor  # (tokens,)
    ia3: torch.Tensor | None = None
    dora: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ia3_stretches: tuple[tuple[int, int, int], ...] | None = None  # see ``AdapterRows``

    def take(self, table: torch.Tensor, columns: slice) -> torch.Tensor:
        """Each token's slot's ``columns`` of ``table``: (tokens, width)."""
        return table[:, columns].index_select(0, self.slots)

    def scale_ia3(self, x: torch.Tensor, columns: slice, *, owned: bool) -> torch.Tensor:
        """``x`` (tokens, width) times each token's slot's IA3 ``columns``: every token by a gather
        of its slot's vector, or only the IA3 stretches, in place (on a copy unless ``x`` is
        ``owned``, the caller's own temporary)."""
        if self.ia3_stretches is None or x.dtype != self.ia3.dtype:
            return x * self.take(self.ia3, columns)
        if not owned:
            x = x.clone()
        for slot, start, stop in self.ia3_stretches:
            x[start:stop].mul_(self.ia3[slot, columns])
        return x


class SlotLinear:
    """A base linear module plus every slot's LoRA (member ``member`` of ``group``) and vectors for it."""

    def __init__(
        self, base: nn.Module, group: LoraGroup, member: int, tables: dict[str, VectorTable]
    ) -> None:
        self.base = base
        self.group, self.member = group, member
        self.in_features, self.out_features = base.in_features, base.out_features
        self.ia3_in = tables["ia3"].columns(self.in_features)
        self.ia3_out = tables["ia3"].columns(self.out_features)
        self.dora = tables["dora"].columns(self.out_features)
        self.bias = tables["bias"].columns(self.out_features)
        # Which of its vectors some resident adapter has written (the others are identity everywhere).
        self.uses: set[str] = set()
        # A dense merged (weight, bias) standing in for a 4-bit base while an adapter is merged.
        self.merged: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # A oneDNN-prepacked copy of a dense fp32 weight on the CPU (``pack``).
        self.packed: torch.Tensor | None = None
        self.pack()

    def pack(self) -> None:
        """Hold a oneDNN-prepacked copy of a dense fp32 CPU weight, re-made whenever the weight changes
        (merge, unmerge). MKL's GEMM, which ``nn.Linear`` calls, repacks the weight on every call;
        oneDNN's ``_linear_pointwise`` (the op torch.compile's CPU backend emits for linears) takes
        the prepacked weight with plain input and output, so no layout conversion is paid per call
        either. Measured on the project's 2-core EPYC VM, a 960 → 2560 projection at 8 rows: 135 µs,
        against 305 through ``torch.utils.mkldnn.MkldnnLinear`` and 559 through ``nn.Linear``. It
        costs a second copy of those weights in memory."""
        weight = getattr(self.base, "weight", None)
        usable = (
            not is_quantized(self.base)
            and weight is not None
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach()) if usable else None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The base projection of ``x``: merged, prepacked or the module itself."""
        if self.merged is not None:
            weight, bias = self.merged
            return F.linear(x.to(weight.dtype), weight, bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.packed, self.base_bias, "none", [], ""
            )
        return self.base(x)

    @property
    def base_bias(self) -> torch.Tensor | None:
        return self.base.bias

    def __call__(
        self,
        x: torch.Tensor,
        vectors: RowVectors,
        shrunk: tuple[torch.Tensor, ...] | None,
        lora: LoraRows | None,
        *,
        owned_input: bool = False,
    ) -> torch.Tensor:
        """``x``: (tokens, in); ``shrunk``: the group's ``x Aᵀ`` of the LoRA tokens per member, None
        without any; ``owned_input``: nothing reads ``x`` after this projection (its IA3 may scale
        it in place)."""
        if vectors.ia3 is not None and "ia3_in" in self.uses:
            x = vectors.scale_ia3(x, self.ia3_in, owned=owned_input)
        out = self._project(x)
        if vectors.ia3 is not None and "ia3_out" in self.uses:
            out = vectors.scale_ia3(out, self.ia3_out, owned=True)
        if shrunk is not None and lora is not None:
            out = self.group.expand(self.member, shrunk, lora, out)
        if vectors.dora is not None and "dora" in self.uses:
            # DoRA: m/‖W + sBA‖ scales the weight's output and the LoRA's, never the base bias.
            scale = vectors.take(vectors.dora, self.dora)
            bias = self.base_bias if self.merged is None else self.merged[1]
            out = out * scale if bias is None else (out - bias) * scale + bias
        if vectors.bias is not None and "bias" in self.uses:
            out = out + vectors.take(vectors.bias, self.bias)
        return out

    def slot_views(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``slot``'s LoRA rows: (max rank × in) and (max rank × out) views."""
        return self.group.slot_views(slot, self.member)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight this module multiplies by, as a dense matrix; 4-bit weights are dequantized."""
        return dense_weight(self.base, dtype)


class SlotEmbedding:
    """The input embedding plus every slot's embedding LoRA and trainable tokens."""

    def __init__(self, base: nn.Embedding, num_slots: int, max_rank: int, dtype: torch.dtype, device: str):
        self.base = base
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.vocab, self.hidden = base.weight.shape
        # Gemma's embedding scales its output; PEFT scales an embedding LoRA's and a trainable token's too.
        scale = getattr(base, "embed_scale", None)
        self.scale = None if scale is None else scale.to(dtype)
        self.lora_a: torch.Tensor | None = None  # (slots, vocab, max rank)
        self.lora_b: torch.Tensor | None = None  # (slots, max rank, hidden), scaling included
        self.token_index: torch.Tensor | None = None  # (slots, vocab): row of token_rows, or -1
        self.token_rows: torch.Tensor | None = None  # (slots, capacity, hidden)
        self.token_ids: torch.Tensor | None = None  # (slots, capacity): the replaced ids, -1 padding

    def allocate_lora(self) -> None:
        if self.lora_a is None:
            shape = (self.num_slots, self.vocab, self.max_rank)
            self.lora_a = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.lora_b = torch.zeros(
                self.num_slots, self.max_rank, self.hidden, dtype=self.dtype, device=self.device
            )

    def allocate_tokens(self, capacity: int) -> None:
        if self.token_index is None:
            self.token_index = torch.full(
                (self.num_slots, self.vocab), -1, dtype=torch.long, device=self.device
            )
            self.token_rows = torch.zeros(
                self.num_slots, capacity, self.hidden, dtype=self.dtype, device=self.device
            )
            self.token_ids = torch.full((self.num_slots, capacity), -1, dtype=torch.long, device=self.device)

    def __call__(
        self, ids: torch.Tensor, slots: torch.Tensor, lora: LoraRows | None, tokens: bool
    ) -> torch.Tensor:
        """Embeddings of ``ids`` (tokens,) of rows serving ``slots`` (tokens,)."""
        embeds = self.base(ids)
        if tokens and self.token_index is not None:
            index = self.token_index[slots, ids]
            replaced = self.token_rows[slots, index.clamp(min=0)]
            if self.scale is not None:
                replaced = replaced * self.scale
            embeds = torch.where((index >= 0).unsqueeze(-1), replaced.to(embeds.dtype), embeds)
        if lora is not None and self.lora_a is not None:
            lora_ids = ids if lora.tokens is None else ids.index_select(0, lora.tokens)
            after_a = self.lora_a[lora.token_slots, lora_ids, : lora.rank]
            delta = lora.multiply(after_a, lambda rank: SlotTables(self.lora_b[:, :rank]))
            if self.scale is not None:
                delta = delta * self.scale
            delta = delta.to(embeds.dtype)
            embeds = embeds.add_(delta) if lora.tokens is None else embeds.index_add_(0, lora.tokens, delta)
        return embeds

    def tied_logits(self, hidden: torch.Tensor, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Logits of a tied output head whose rows the rows' trainable tokens replace.

        Added as a difference, ``h · (row − W[id])ᵀ``, so that whatever else adds to those logits (a
        LoRA on the head) stays, as it does in PEFT, where the replaced rows sit beneath the LoRA.
        """
        ids = self.token_ids[slots]  # (batch, capacity), -1 padding
        original = self.base.weight[ids.clamp(min=0)].to(self.dtype)
        change = torch.bmm(self.token_rows[slots] - original, hidden.unsqueeze(-1).to(self.dtype)).squeeze(-1)
        # Padding entries add into one spare column past the vocabulary, dropped afterwards.
        columns = torch.where(ids >= 0, ids, logits.shape[1])
        spare = logits.new_zeros(logits.shape[0], 1)
        widened = torch.cat([logits, spare], dim=1).scatter_add(1, columns, change.to(logits.dtype))
        return widened[:, :-1]


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def dense_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a projection multiplies by, as a dense matrix; 4-bit weights are dequantized."""
    from adapterhub.errors import UserError

    if type(module).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    if is_quantized(module):
        raise UserError("int8 weights cannot be read back as a dense matrix: use quantization none or nf4")
    return module.weight.data
